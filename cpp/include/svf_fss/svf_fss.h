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

namespace svf_fss {

// An 8-bit image, rows of w * channels bytes.
struct Image {
  int height = 0, width = 0, channels = 0;
  std::vector<uint8_t> pixels;
};

// RGB from a PNG (8/16-bit, grey, palette, with or without alpha) or, where built with libjpeg, a JPEG.
// Unlike Python (Pillow) it applies no EXIF orientation.
Image read_image(const std::string& path);
// A support mask as Python reads it (serving/inputs.py read_mask): 1 object, 0 background, 255 ignore,
// from 0/1(/255) or 0/255 values, the alpha channel where it is not fully opaque; other values are
// refused unless threshold (0 < t < 1) binarises them. Throws std::runtime_error naming the file.
Image read_mask(const std::string& path, double threshold = -1);
void write_png(const std::string& path, const Image& image);

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

// The threads a model call may use now: the cores this process may run on less those other processes keep
// busy (cpp/src/threads.cpp), at least 1. LibTorch's default (every core) collapses on a busy machine.
int fair_threads();

}  // namespace svf_fss
