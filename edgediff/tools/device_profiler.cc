// Per-kernel timing inside a Relax VM on a device, for `edgediff bench --rpc --profile`.
//
// TVM 0.27's VM times kernels only through set_instrument(callback), and TVM's RPC cannot pass a function
// (host or remote) as an argument. This small library is uploaded to the device next to the model; its
// `edgediff_profile_attach(vm)` builds the instrument on the device and hands it to the VM there, so the
// clock is read on the device around each kernel call and no network time enters the figures.
// Built by edgediff/tools/remote.py with the artifact's (cross) compiler against tvm-ffi's headers; its
// tvm-ffi symbols resolve against the libtvm_ffi the RPC server has already loaded.
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <chrono>
#include <map>
#include <mutex>
#include <sstream>
#include <string>

namespace {

struct Kernel {
  double seconds = 0.0;
  int64_t calls = 0;
};

std::mutex lock;
std::map<std::string, Kernel> kernels;
std::map<std::string, std::chrono::steady_clock::time_point> starts;

// The VM calls instrument(func, symbol, before, ret, *args) before and after every call instruction;
// returning 0 (VMInstrumentReturnKind::kNoOp) lets the call run normally.
void Instrument(tvm::ffi::PackedArgs args, tvm::ffi::Any* ret) {
  auto now = std::chrono::steady_clock::now();
  std::string symbol = args[1].cast<tvm::ffi::String>();
  bool before = args[2].cast<bool>();
  std::lock_guard<std::mutex> guard(lock);
  if (before) {
    starts[symbol] = now;
  } else {
    auto found = starts.find(symbol);
    if (found != starts.end()) {
      Kernel& kernel = kernels[symbol];
      kernel.seconds += std::chrono::duration<double>(now - found->second).count();
      kernel.calls += 1;
      starts.erase(found);
    }
  }
  *ret = static_cast<int64_t>(0);
}

void NoOp(tvm::ffi::PackedArgs, tvm::ffi::Any* ret) { *ret = static_cast<int64_t>(0); }

void SetInstrument(tvm::ffi::Module vm, bool on) {
  auto set = vm->GetFunction("set_instrument", false);
  TVM_FFI_ICHECK(set.has_value()) << "the module is not a Relax VM (no set_instrument)";
  (*set)(tvm::ffi::Function::FromPacked(on ? Instrument : NoOp));
}

int64_t Attach(tvm::ffi::Module vm) {
  {
    std::lock_guard<std::mutex> guard(lock);
    kernels.clear();
    starts.clear();
  }
  SetInstrument(vm, true);
  return 0;
}

int64_t Detach(tvm::ffi::Module vm) {
  SetInstrument(vm, false);
  return 0;
}

// {"symbol": [seconds, calls], ...} since the last attach
tvm::ffi::String Report() {
  std::lock_guard<std::mutex> guard(lock);
  std::ostringstream os;
  os.precision(9);
  os << "{";
  bool first = true;
  for (const auto& [symbol, kernel] : kernels) {
    os << (first ? "" : ", ") << "\"" << symbol << "\": [" << kernel.seconds << ", " << kernel.calls << "]";
    first = false;
  }
  os << "}";
  return tvm::ffi::String(os.str());
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgediff_profile_attach, Attach);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgediff_profile_detach, Detach);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(edgediff_profile_report, Report);
