"""Real weights from a local diffusers folder (a component or a whole pipeline), never from a hub."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from edgediff.errors import ModelNotFoundError
from edgediff.zoo.builder import ZooModel, family_of, make_zoo_model, resolve_class_name
from edgediff.zoo.configs import TRANSFORMERS_CLASSES, WRAPPABLE


def load_local(
    path: str | os.PathLike,
    *,
    batch: int = 1,
    latent_size: int | None = None,
    subfolder: str | None = None,
    seq_len: int | None = None,
) -> ZooModel:
    """Load real weights from a local diffusers folder, never touching the network.

    ``path`` is either a component folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or
    ``.bin``) or a pipeline folder (``model_index.json``), where ``subfolder`` picks the component: by default
    ``unet`` if present, else ``transformer``; ``vae`` gives the VAE decoder and ``text_encoder`` the CLIP
    text encoder (transformers weights: ``model.safetensors`` or ``pytorch_model.bin``). The pipeline's
    scheduler and vae configs, when found, supply the prediction type and VAE scaling factor; its
    ``tokenizer/`` supplies a text encoder's bos/eos/pad ids. ``seq_len`` is the number of text tokens
    (default: 77, 120 or 300 for a denoiser's conditioning by family, a text encoder's position count).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "not a directory" if root.exists() else "no such directory"
        raise ModelNotFoundError(
            f"{root}: {what}; expected a diffusers model folder (config.json + weights) "
            "or a pipeline folder (model_index.json)"
        )
    pipeline_dir: Path | None = None
    if (root / "model_index.json").is_file():
        pipeline_dir = root
        if subfolder is None:
            subfolder = next(
                (s for s in ("unet", "transformer") if (root / s / "config.json").is_file()), None
            )
            if subfolder is None:
                raise ModelNotFoundError(
                    f"{root}: pipeline folder has neither unet/ nor transformer/ with a config.json; "
                    "pass subfolder= to pick a component"
                )
    elif subfolder is None and (root.parent / "model_index.json").is_file():
        pipeline_dir = root.parent  # a component folder inside a pipeline: still use its scheduler/vae
    component = root / subfolder if subfolder else root
    if not (component / "config.json").is_file():
        found = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
        raise ModelNotFoundError(
            f"{component}: no config.json; expected a diffusers model folder"
            + (f" (components here: {', '.join(found)})" if found else "")
        )
    try:
        config = json.loads((component / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{component / 'config.json'}: unreadable model config ({exc})") from exc
    class_name = resolve_class_name(config)
    if class_name not in WRAPPABLE:
        raise ModelNotFoundError(
            f"{component}: model class {class_name or None!r} is not supported; "
            f"expected one of {', '.join(WRAPPABLE)}"
        )
    from_transformers = class_name in TRANSFORMERS_CLASSES
    stems = _TRANSFORMERS_WEIGHTS if from_transformers else _DIFFUSERS_WEIGHTS
    variant = _weights_variant(component, stems)
    if variant is False:
        raise ModelNotFoundError(f"{component}: no weights; expected {' or '.join(stems)} with config.json")

    if from_transformers:
        import transformers

        cls = getattr(transformers, class_name)
        kwargs: dict[str, Any] = {"local_files_only": True, "dtype": torch.float32, "variant": variant}
    else:
        import diffusers

        cls = getattr(diffusers, class_name)
        kwargs = {"local_files_only": True, "torch_dtype": torch.float32, "variant": variant}
        if importlib.util.find_spec("accelerate") is None:
            kwargs["low_cpu_mem_usage"] = False  # what diffusers falls back to anyway, minus its warning
    with _offline():
        try:
            model, info = cls.from_pretrained(str(component), output_loading_info=True, **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFoundError(f"{component}: could not load {class_name} weights: {first}") from exc
    # diffusers and transformers fill weights missing from the checkpoint with random ones and only warn;
    # a compiled model with silently random layers is worse than no model.
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ModelNotFoundError(
            f"{component}: weights do not match config.json: {len(missing)} missing, e.g. {missing[0]}"
        )

    family = family_of(model)
    facts = _pipeline_info(pipeline_dir) if pipeline_dir is not None else {}
    # Pipeline components are named "<pipeline>-<component>" so that e.g. two pipelines' unets differ.
    if pipeline_dir is None:
        name = root.name
    elif pipeline_dir is root:
        name = f"{root.name}-{subfolder}"
    else:
        name = f"{pipeline_dir.name}-{root.name}"
    extra_meta: dict[str, Any] = {"source": str(component.resolve()), "tiny": False}
    if family == "text-encoder" and pipeline_dir is not None and (pipeline_dir / "tokenizer").is_dir():
        from edgediff.runtime.tokenizer import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_directory(pipeline_dir / "tokenizer")
        extra_meta.update(
            {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
        )
    return make_zoo_model(
        model,
        name=name,
        batch=batch,
        latent_size=latent_size,
        seq_len=seq_len,
        prediction_type=facts.get("prediction_type") if family != "vae-decoder" else None,
        scaling_factor=facts.get("scaling_factor"),
        vae_scale_factor=facts.get("vae_scale_factor"),
        num_time_ids=facts.get("num_time_ids", 6),
        extra_meta=extra_meta,
    )


_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _weights_variant(component: Path, stems: tuple[str, ...] = _DIFFUSERS_WEIGHTS) -> str | None | bool:
    """The ``variant`` to load (None: the plain file), or False when there are no weights."""
    for stem in stems:
        if (component / stem).is_file() or (component / f"{stem}.index.json").is_file():
            return None
    # Only e.g. diffusion_pytorch_model.fp16.safetensors: load that variant (upcast to float32 on load).
    for stem in stems:
        base, ext = stem.rsplit(".", 1)
        for candidate in sorted(component.glob(f"{base}.*.{ext}")):
            parts = candidate.name.split(".")
            if len(parts) == 3:
                return parts[1]
    return False


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Belt and braces with ``local_files_only``: tell huggingface_hub not to reach the network."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pipeline_info(pipeline_dir: Path) -> dict[str, Any]:
    """Prediction type, VAE factors and SDXL time-id count recorded elsewhere in a pipeline folder."""
    info: dict[str, Any] = {}
    if _read_json(pipeline_dir / "model_index.json").get("requires_aesthetics_score"):
        info["num_time_ids"] = 5  # the SDXL refiner conditions on an aesthetic score, not a target size
    sched = _read_json(pipeline_dir / "scheduler" / "scheduler_config.json")
    if sched:
        pred = sched.get("prediction_type")
        if pred == "flow_prediction" or "FlowMatch" in str(sched.get("_class_name", "")):
            info["prediction_type"] = "flow"
        elif pred in ("epsilon", "v_prediction", "sample"):
            info["prediction_type"] = pred
    vae = _read_json(pipeline_dir / "vae" / "config.json")
    if vae:
        # AutoencoderKL's default, which old SD configs leave implicit.
        info["scaling_factor"] = float(vae.get("scaling_factor") or 0.18215)
        if vae.get("_class_name") == "AutoencoderKL" and vae.get("block_out_channels"):
            info["vae_scale_factor"] = 2 ** (len(vae["block_out_channels"]) - 1)
        if vae.get("_class_name") == "AutoencoderDC" and vae.get("encoder_block_out_channels"):
            info["vae_scale_factor"] = 2 ** (len(vae["encoder_block_out_channels"]) - 1)  # as SanaPipeline
    return info
