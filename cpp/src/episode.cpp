// The Python pipeline's preprocessing and mapping back, with the same LibTorch operators (bit-exact).
#include <cmath>
#include <stdexcept>

#include <ATen/Version.h>
#include <torch/nn/functional/vision.h>
#include <torch/torch.h>

#include "svf_fss/svf_fss.h"

namespace svf_fss {
namespace {

namespace F = torch::nn::functional;
const double MEAN[3] = {0.485, 0.456, 0.406}, STD[3] = {0.229, 0.224, 0.225};
constexpr int IGNORE = 255;

// [1,C,h,w] uint8 with the strides torchvision sees: a numpy HWC array permuted to CHW (channels last)
at::Tensor planar(const Image& img) {
  auto hwc = torch::from_blob(const_cast<uint8_t*>(img.pixels.data()), {img.height, img.width, img.channels},
                              torch::kUInt8);
  return hwc.permute({2, 0, 1}).unsqueeze(0);
}

// torchvision.transforms.v2.functional.resize of a uint8 image: the native uint8 kernel where the CPU
// has AVX2/AVX-512 (as torchvision decides), else float, rounded back to uint8.
at::Tensor resize_image(at::Tensor x, int nh, int nw) {
  if (x.size(2) == nh && x.size(3) == nw) return x;
  auto cap = at::get_cpu_capability();
  bool native = cap == "AVX2" || cap == "AVX512";
  auto opts = F::InterpolateFuncOptions().size(std::vector<int64_t>{nh, nw}).mode(torch::kBilinear)
                  .align_corners(false).antialias(true);
  if (native) return F::interpolate(x, opts);
  return F::interpolate(x.to(torch::kFloat32), opts).round_().to(torch::kUInt8);
}

at::Tensor resize_mask(at::Tensor m, int nh, int nw) {
  if (m.size(2) == nh && m.size(3) == nw) return m;
  return F::interpolate(m, F::InterpolateFuncOptions().size(std::vector<int64_t>{nh, nw}).mode(torch::kNearest));
}

struct Transformed {
  at::Tensor image, mask;   // [3,S,S] float normalised, [S,S] uint8
  int nh, nw;
};

// pipeline/data/episodes.py eval_transform (protocol "random")
Transformed eval_transform(const Image& img, const Image* mask, int size) {
  double s = double(size) / std::max(img.height, img.width);
  int nh = std::max<int>(1, int(std::nearbyint(img.height * s))), nw = std::max<int>(1, int(std::nearbyint(img.width * s)));
  auto x = resize_image(planar(img), nh, nw)[0];
  auto padded = torch::empty({3, size, size}, torch::kUInt8);
  for (int c = 0; c < 3; ++c) padded[c].fill_(int(std::nearbyint(MEAN[c] * 255)));
  padded.slice(1, 0, nh).slice(2, 0, nw).copy_(x);
  auto mean = torch::tensor({MEAN[0], MEAN[1], MEAN[2]}, torch::kFloat32).view({3, 1, 1});
  auto std = torch::tensor({STD[0], STD[1], STD[2]}, torch::kFloat32).view({3, 1, 1});
  auto image = (padded.to(torch::kFloat32) / 255.0).sub_(mean).div_(std);
  at::Tensor m;
  if (mask) {
    auto small = resize_mask(planar(*mask), nh, nw)[0][0];
    m = torch::full({size, size}, IGNORE, torch::kUInt8);
    m.slice(0, 0, nh).slice(1, 0, nw).copy_(small);
  }
  return {image, m, nh, nw};
}

}  // namespace

Episode make_episode(const Image& query, const std::vector<Image>& supports, const std::vector<Image>& masks,
                     int size) {
  if (supports.empty()) throw std::runtime_error("at least one support image is needed");
  if (supports.size() != masks.size())
    throw std::runtime_error(std::to_string(supports.size()) + " support images but " + std::to_string(masks.size()) +
                             " masks; give one mask per support");
  std::vector<at::Tensor> xs, ms;
  for (size_t i = 0; i < supports.size(); ++i) {
    if (masks[i].height != supports[i].height || masks[i].width != supports[i].width)
      throw std::runtime_error("mask " + std::to_string(i + 1) + " is " + std::to_string(masks[i].width) + "x" +
                               std::to_string(masks[i].height) + " but its image is " +
                               std::to_string(supports[i].width) + "x" + std::to_string(supports[i].height));
    auto t = eval_transform(supports[i], &masks[i], size);
    xs.push_back(t.image);
    ms.push_back((t.mask == 1).to(torch::kFloat32));
  }
  auto q = eval_transform(query, nullptr, size);
  Episode e;
  e.query = q.image.unsqueeze(0).contiguous();
  e.support = torch::stack(xs).unsqueeze(0).contiguous();
  e.support_mask = torch::stack(ms).unsqueeze(0).contiguous();
  e.valid_h = q.nh, e.valid_w = q.nw, e.height = query.height, e.width = query.width;
  return e;
}

// pipeline/evaluate.py predict_original
at::Tensor mask_of(const at::Tensor& logits, const Episode& e) {
  auto crop = logits.slice(1, 0, e.valid_h).slice(2, 0, e.valid_w).unsqueeze(0).to(torch::kFloat32);
  auto up = F::interpolate(crop, F::InterpolateFuncOptions().size(std::vector<int64_t>{e.height, e.width})
                                     .mode(torch::kBilinear).align_corners(true));
  return (up[0][1] > up[0][0]).to(torch::kUInt8).contiguous();   // argmax of 2 channels, ties to 0
}

}  // namespace svf_fss
