"""Train the tiny text-to-image latent diffusion model that ships in ``models/tiny-shapes-t2i/``.

    nice -n 10 python scripts/train_tiny_t2i.py --output models/tiny-shapes-t2i

The data are ``edgediff.tools.shapes`` pictures (colored circles, squares and triangles at five places on a
dark background, 32x32, captions such as "a red circle at the top left"). Three standard models, saved as an
ordinary diffusers ``StableDiffusionPipeline`` folder with safetensors weights:

1. a CLIP BPE tokenizer (``vocab.json`` + ``merges.txt``: the byte alphabet plus merges until every caption
   word is one token), which transformers' ``CLIPTokenizer`` and edgediff's torch-free one both read;
2. an ``AutoencoderKL`` (32x32x3 <-> 8x8x4), trained first on reconstruction + a small KL term; its
   ``scaling_factor`` is set so that the latents have unit standard deviation, as SD's 0.18215 does;
3. a ``CLIPTextModel`` and a ``UNet2DConditionModel`` with cross-attention, trained together on the epsilon
   objective over SD 1.5's noise schedule. The text encoder is trained, not frozen-random: its weights then
   have a trained model's activation statistics, which is what low-precision builds of it should be measured
   on, and it costs little (it is a few percent of the step). 10% of captions are dropped to the empty
   prompt, so that classifier-free guidance works.

Seeded and deterministic on CPU (2 threads); about 10 minutes on 2 cores. The script ends by sampling a few
prompts with diffusers' StableDiffusionPipeline (DPM-Solver++) and printing the checker's recognition rate.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edgediff.runtime.tokenizer import CLIPTokenizer, bytes_to_unicode, normalize, pre_tokenize
from edgediff.tools import shapes

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SEQ_LEN = 16  # "a yellow triangle at the bottom right" is 9 tokens with bos/eos
TEXT_WIDTH = 64


# ---------------------------------------------------------------------------------------------- tokenizer


def all_captions() -> list[str]:
    labels = shapes.all_labels()
    out = [lab.caption() for lab in labels]
    out += sorted({shapes.Label(lab.color, lab.shape).caption() for lab in labels})
    return out


def write_tokenizer(folder: Path) -> Path:
    """A CLIP-layout vocabulary (256 byte symbols, the same with ``</w>``, merged symbols, bos, eos) whose
    merges (greedy BPE, most frequent pair first) make every caption word a single token."""
    chars = bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for piece in pre_tokenize(normalize(" ".join(all_captions()))):
        symbols = [chars[b] for b in piece.encode("utf-8")]
        symbols[-1] += "</w>"
        words[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    while any(len(w) > 1 for w in words):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    alphabet = list(chars.values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    lines = "\n".join(f"{a} {b}" for a, b in merges)
    (folder / "merges.txt").write_text(f"#version: 0.2\n{lines}\n", encoding="utf-8")

    def added(content: str) -> dict:  # how SD 1.5's tokenizer_config.json records special tokens
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
        }

    specials = {"bos_token": added(BOS), "eos_token": added(EOS), "unk_token": added(EOS), "pad_token": EOS}
    config = {**specials, "do_lower_case": True, "model_max_length": SEQ_LEN, "errors": "replace"}
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "CLIPTokenizer"}, indent=2)
    )
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return folder


# ------------------------------------------------------------------------------------------------- models


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=shapes.SIZE,
    )


def make_text_encoder(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=SEQ_LEN,
        hidden_act="quick_gelu",
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        projection_dim=TEXT_WIDTH,
    )
    return CLIPTextModel(cfg)


def make_unet(heads: int = 8, cross_attention_at_4x4: bool = False):
    from diffusers import UNet2DConditionModel

    low = "CrossAttn" if cross_attention_at_4x4 else ""
    return UNet2DConditionModel(
        sample_size=shapes.SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", f"{low}DownBlock2D"),
        up_block_types=(f"{low}UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=16,
    )


def make_scheduler():
    # SD 1.5's noise schedule; DPM-Solver++ (2nd order) is what the demo and tests sample with
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        steps_offset=1,  # as SD 1.5's; StableDiffusionPipeline warns about (and patches) any other
    )


# ------------------------------------------------------------------------------------------------ training


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    x_all = images * 2 - 1
    ema = None
    for step in (bar := tqdm(range(steps), desc="vae", mininterval=5)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 2e-3)
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        kl = post.kl().mean() / x[0].numel()
        # L1 keeps the shapes' edges (and so circle vs square) sharper than MSE alone
        loss = mse + (rec - x).abs().mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema = mse.item() if ema is None else 0.98 * ema + 0.02 * mse.item()
        bar.set_postfix(mse=f"{ema:.5f}")
    return ema


def train_diffusion(
    unet,
    text_encoder,
    latents,
    ids,
    null_ids,
    sched,
    steps: int,
    batch: int,
    seed: int,
    p_drop: float,
    high_noise_share: float = 0.0,
    lr: float = 1e-3,
    ema_decay: float = 0.0,
) -> float:
    """Train the UNet and text encoder together; with ``ema_decay`` > 0 both end holding the exponential
    moving average of their weights (what is sampled from), not the last step's."""
    gen = torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    averaged = [p.detach().clone() for p in params] if ema_decay > 0 else None
    alphas = sched.alphas_cumprod.float()
    ema = None
    for step in (bar := tqdm(range(steps), desc="unet+text", mininterval=5)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        z0 = latents[idx]
        tok = ids[idx].clone()
        drop = torch.rand(batch, generator=gen) < p_drop
        tok[drop] = null_ids
        t = torch.randint(0, len(alphas), (batch,), generator=gen)
        if high_noise_share > 0:
            # part of the batch at high noise only (t >= 400), where the layout (which shape, where) is
            # decided; the low-noise range only teaches sharpening, and learns fast
            t_high = torch.randint(400, len(alphas), (batch,), generator=gen)
            t = torch.where(torch.arange(batch) < round(high_noise_share * batch), t_high, t)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = text_encoder(tok)[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if averaged is not None:
            # warm-up as in Karras et al.: early steps average over a shorter window
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(averaged, [p.detach() for p in params], 1 - decay)
        ema = loss.item() if ema is None else 0.99 * ema + 0.01 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
    if averaged is not None:
        with torch.no_grad():
            torch._foreach_copy_(params, averaged)
    return ema


def check(folder: Path, seeds: int, steps: int) -> tuple[float, list[tuple[str, np.ndarray, bool]]]:
    """Sample every color x shape prompt (with and without a place) through diffusers'
    StableDiffusionPipeline and read the pictures with the checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    checker = shapes.ShapeChecker()
    prompts = [lab.caption() for lab in shapes.all_labels()[::2]] + ["a blue square", "a red circle"]
    results = []
    for i, prompt in enumerate(tqdm(prompts * seeds, desc="check", mininterval=5)):
        gen = torch.Generator().manual_seed(i)
        image = pipe(
            prompt, num_inference_steps=steps, guidance_scale=7.5, generator=gen, output_type="np"
        ).images[0]
        results.append((prompt, image, checker.matches(image, prompt)))
    return sum(ok for *_, ok in results) / len(results), results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, default=Path("models/tiny-shapes-t2i"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=3000, help="data set size (60 labels, jittered)")
    ap.add_argument("--vae-steps", type=int, default=500)
    ap.add_argument("--unet-steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--high-noise-share",
        type=float,
        default=0.0,
        help="share of each UNet batch drawn at high noise only (t >= 400); 0: uniform t",
    )
    ap.add_argument("--unet-batch", type=int, help="batch of the UNet stage (default: --batch)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the UNet stage")
    ap.add_argument("--ema-decay", type=float, default=0.0, help="sample from an EMA of the weights; 0: off")
    ap.add_argument("--heads", type=int, default=8, help="attention heads in the UNet's transformer blocks")
    ap.add_argument(
        "--cross-attention-at-4x4",
        action="store_true",
        help="cross-attention also in the 4x4 level's down and up blocks (not only 8x8 and mid)",
    )
    ap.add_argument(
        "--unet-from",
        type=Path,
        help="continue from the UNet and text encoder of an earlier output (a second stage: its own warm-up "
        "and cosine schedule over --unet-steps, batches drawn with a different seed)",
    )
    ap.add_argument(
        "--vae-from",
        type=Path,
        help="take the VAE from an earlier output of this script with the same --seed/--images/--vae-steps "
        "(the VAE stage is deterministic: this only skips recomputing it)",
    )
    ap.add_argument("--threads", type=int, default=1, help="1: OpenMP threads spin-wait on a loaded machine")
    ap.add_argument("--check-seeds", type=int, default=2, help="samples per prompt in the final check")
    ap.add_argument("--grid", type=Path, default=None, help="write the check's pictures here (PNG)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    start = time.time()
    out: Path = args.output
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    tok_dir = write_tokenizer(tmp / "tokenizer")
    tokenizer = CLIPTokenizer.from_directory(tok_dir)
    images_np, captions, labels = shapes.dataset(args.images, seed=args.seed)
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous()
    ids = torch.from_numpy(np.asarray(tokenizer(captions), dtype=np.int64))
    null_ids = torch.from_numpy(np.asarray(tokenizer([""]), dtype=np.int64))[0]

    vae = make_vae()  # always: its initialisation draws from the global RNG the UNet's then continues
    if args.vae_from is not None:
        from diffusers import AutoencoderKL

        earlier = json.loads((args.vae_from / "training.json").read_text())
        same = {k: earlier["args"][k] for k in ("seed", "images", "vae_steps", "batch")}
        if same != {k: getattr(args, k) for k in same}:
            raise SystemExit(f"--vae-from {args.vae_from} was trained with {same}")
        vae.load_state_dict(AutoencoderKL.from_pretrained(args.vae_from / "vae").state_dict())
        vae_mse = earlier["vae_mse"]
    else:
        vae_mse = train_vae(vae, images, args.vae_steps, args.batch, args.seed)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean for i in range(0, len(images), 256)]
        )
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(tmp / "vae")  # early, to look at while the UNet trains
    with torch.no_grad():
        rec = vae.decode(latents[:240]).sample.clamp(-1, 1).add(1).div(2).permute(0, 2, 3, 1).numpy()
    checker = shapes.ShapeChecker()
    rec_rate = checker.recognition_rate(list(rec), labels[:240])
    print(f"vae: checker reads {rec_rate:.3f} of 240 reconstructions right")
    latents = latents * scale
    print(
        f"vae: mse {vae_mse:.5f} (images in -1..1), latent std {1 / scale:.4f} -> scaling_factor {scale:.4f}"
    )

    text_encoder = make_text_encoder(tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id)
    unet = make_unet(args.heads, args.cross_attention_at_4x4)
    if args.unet_from is not None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(args.unet_from / "unet").state_dict())
        text_encoder.load_state_dict(
            CLIPTextModel.from_pretrained(args.unet_from / "text_encoder").state_dict()
        )
    sched = make_scheduler()
    from diffusers import DDPMScheduler

    train_sched = DDPMScheduler.from_config(sched.config)
    loss = train_diffusion(
        unet,
        text_encoder,
        latents,
        ids,
        null_ids,
        train_sched,
        args.unet_steps,
        args.unet_batch or args.batch,
        args.seed + (2 if args.unet_from is not None else 1),
        0.1,
        args.high_noise_share,
        args.lr,
        args.ema_decay,
    )
    train_minutes = (time.time() - start) / 60
    print(f"unet+text: loss {loss:.4f}; training took {train_minutes:.1f} min")

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer as HFTokenizer

    unet.eval()
    text_encoder.eval()
    hf_tok = HFTokenizer.from_pretrained(tok_dir)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=hf_tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    # the hand-written vocab.json + merges.txt as SD folders ship them; not transformers 5's tokenizer.json
    (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    write_tokenizer(tmp / "tokenizer")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / "training.json").write_text(
        json.dumps(
            {
                "command": "scripts/train_tiny_t2i.py "
                + " ".join(
                    f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}")
                    for k, v in vars(args).items()
                    if k not in ("output", "grid") and v not in (None, False)
                ),
                "args": {
                    k: v for k, v in vars(args).items() if k in ("seed", "images", "vae_steps", "batch")
                },
                "vae_mse": round(vae_mse, 6),
                "diffusion_loss": round(loss, 5),
                "scaling_factor": scale,
                "train_minutes": round(train_minutes, 2),
            },
            indent=2,
        )
        + "\n"
    )
    if args.check_seeds == 0:
        return
    rate, results = check(out, args.check_seeds, steps=20)
    print(
        "recognition rate (StableDiffusionPipeline, DPM-Solver++ 20 steps, guidance 7.5): "
        f"{rate:.3f} over {len(results)}"
    )
    if args.grid:
        shapes.labelled_grid([r[1] for r in results], [r[0] for r in results], [r[2] for r in results]).save(
            args.grid
        )


if __name__ == "__main__":
    main()
