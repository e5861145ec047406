// The TensorRT engine (model.engine) through the runtime API of TensorRT 10 and 11: named I/O tensors,
// setInputShape per call, enqueueV3 on a CUDA stream. Compiled only where TensorRT is found.
#include <cuda_runtime_api.h>

#include <NvInfer.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>

#include <torch/torch.h>

#include "svf_fss/svf_fss.h"

namespace svf_fss {
namespace {

void check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(rc));
}

class Logger : public nvinfer1::ILogger {
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "TensorRT: " << msg << "\n";
  }
};

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  void reserve(size_t n) {
    if (n <= bytes) return;
    if (ptr) cudaFree(ptr);
    check(cudaMalloc(&ptr, n), "cudaMalloc");
    bytes = n;
  }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
};

class TensorRTBackend : public Backend {
 public:
  TensorRTBackend(const std::string& path, int input_size) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error(path + ": cannot open the engine");
    std::vector<char> blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_)
      throw std::runtime_error(path + ": TensorRT could not load the engine (built by another TensorRT version or "
                               "for another GPU? see its .json sidecar)");
    context_.reset(engine_->createExecutionContext());
    check(cudaStreamCreate(&stream_), "cudaStreamCreate");
    size = input_size;
  }
  ~TensorRTBackend() override { cudaStreamDestroy(stream_); }

  at::Tensor run(const at::Tensor& query, const at::Tensor& support, const at::Tensor& support_mask) override {
    const std::pair<const char*, at::Tensor> inputs[] = {
        {"query", query.contiguous()}, {"support", support.contiguous()}, {"support_mask", support_mask.contiguous()}};
    for (size_t i = 0; i < 3; ++i) {
      const auto& t = inputs[i].second;
      nvinfer1::Dims dims{};
      dims.nbDims = int32_t(t.dim());
      for (int d = 0; d < dims.nbDims; ++d) dims.d[d] = t.size(d);
      if (!context_->setInputShape(inputs[i].first, dims))
        throw std::runtime_error(std::string("the engine does not take ") + inputs[i].first + " of this shape "
                                 "(outside its optimisation profile)");
      buffers_[i].reserve(t.nbytes());
      check(cudaMemcpyAsync(buffers_[i].ptr, t.data_ptr(), t.nbytes(), cudaMemcpyHostToDevice, stream_), "copy in");
      context_->setTensorAddress(inputs[i].first, buffers_[i].ptr);
    }
    auto out = torch::empty({query.size(0), 2, query.size(2), query.size(3)}, torch::kFloat32);
    buffers_[3].reserve(out.nbytes());
    context_->setTensorAddress("logits", buffers_[3].ptr);
    if (!context_->enqueueV3(stream_)) throw std::runtime_error("TensorRT enqueueV3 failed");
    check(cudaMemcpyAsync(out.data_ptr(), buffers_[3].ptr, out.nbytes(), cudaMemcpyDeviceToHost, stream_), "copy out");
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return out;
  }
  std::string name() const override { return "tensorrt"; }

 private:
  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  cudaStream_t stream_ = nullptr;
  DeviceBuffer buffers_[4];
};

}  // namespace

bool has_tensorrt() { return true; }
std::unique_ptr<Backend> load_tensorrt(const std::string& engine, int size) {
  return std::make_unique<TensorRTBackend>(engine, size);
}

}  // namespace svf_fss
