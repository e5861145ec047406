// The AOTInductor package (model.pt2) of the export stage, through LibTorch's package loader.
#include <stdexcept>

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include "svf_fss/svf_fss.h"

namespace svf_fss {
namespace {

class AotiBackend : public Backend {
 public:
  explicit AotiBackend(const std::string& package) : loader_(package) {
    auto meta = loader_.get_metadata();
    auto it = meta.find("svf_fss.input_size");
    if (it == meta.end())
      throw std::runtime_error(package + " carries no svf_fss.input_size: it was not written by the export stage");
    size = std::stoi(it->second);
    auto dev = meta.find("AOTI_DEVICE_KEY");
    device_ = dev != meta.end() && dev->second == "cuda" ? at::kCUDA : at::kCPU;
  }
  at::Tensor run(const at::Tensor& query, const at::Tensor& support, const at::Tensor& support_mask) override {
    c10::InferenceMode guard;
    // the compiled code reads its inputs as contiguous whatever their strides (export/aoti.py)
    auto out = loader_.run({query.to(device_).contiguous(), support.to(device_).contiguous(),
                            support_mask.to(device_).contiguous()});
    return out.at(0).to(at::kCPU);
  }
  std::string name() const override { return device_ == at::kCUDA ? "aoti (cuda)" : "aoti (cpu)"; }

 private:
  torch::inductor::AOTIModelPackageLoader loader_;
  at::DeviceType device_;
};

}  // namespace

std::unique_ptr<Backend> load_aoti(const std::string& package) {
  try {
    return std::make_unique<AotiBackend>(package);
  } catch (const c10::Error& e) {   // LibTorch's message carries a C++ backtrace; the first line says it
    throw std::runtime_error(package + " is not an AOTInductor package that loads here (" + e.msg() +
                             "); the export stage writes models/fold<i>/<k>shot/aoti/model.pt2");
  }
}

#ifndef SVF_FSS_TENSORRT
bool has_tensorrt() { return false; }
std::unique_ptr<Backend> load_tensorrt(const std::string&, int) {
  throw std::runtime_error("this build has no TensorRT backend: TensorRT was not found when it was configured "
                           "(set TENSORRT_ROOT and configure again)");
}
#endif

}  // namespace svf_fss
