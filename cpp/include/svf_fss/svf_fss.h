// svf-fss in C++: one few-shot episode (k support images + masks, a query) through the exported model.
//
// The preprocessing is the Python pipeline's (pipeline/data/episodes.py eval_transform,
// pipeline/evaluate.py predict_original), written with the same LibTorch operators so that the tensors
// are bit for bit those of Python: longer side resized to the model's size (bilinear, antialiased),
// padded right/bottom with the mean colour, normalised; masks resized nearest, padded with "ignore";
// the logits of the valid region mapped back to the query's size (bilinear, corners aligned), argmax.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "svf_fss/image.h"
#include "svf_fss/threads.h"

namespace svf_fss {

struct Episode {
  at::Tensor query;         // [1,3,S,S] float32
  at::Tensor support;       // [1,K,3,S,S]
  at::Tensor support_mask;  // [1,K,S,S] 1 object, 0 not
  int valid_h = 0, valid_w = 0, height = 0, width = 0;   // the query's resized region and original size
};

Episode make_episode(const Image& query, const std::vector<Image>& supports, const std::vector<Image>& masks,
                     int size);
// The 0/1 mask [H,W] (uint8) at the query's resolution from one episode's logits [2,S,S].
at::Tensor mask_of(const at::Tensor& logits, const Episode& episode);

class Backend {
 public:
  virtual ~Backend() = default;
  // logits [B,2,S,S] float32 on the CPU
  virtual at::Tensor run(const at::Tensor& query, const at::Tensor& support, const at::Tensor& support_mask) = 0;
  virtual std::string name() const = 0;
  int size = 0;            // the square input size the model was exported for
};

// The AOTInductor package written by the export stage (model.pt2); its size from the package's metadata.
std::unique_ptr<Backend> load_aoti(const std::string& package);
// A TensorRT engine (model.engine) and its input size; only where built with TensorRT (SVF_FSS_TENSORRT).
std::unique_ptr<Backend> load_tensorrt(const std::string& engine, int size);
bool has_tensorrt();


}  // namespace svf_fss
