// The Python pipeline's preprocessing and mapping back, with the same LibTorch operators (bit-exact).
#include <cmath>
#include <stdexcept>

#include <ATen/ATen.h>
#include <ATen/Version.h>

#include "svf_fss/svf_fss.h"

namespace svf_fss {
namespace {

const double MEAN[3] = {0.485, 0.456, 0.406}, STD[3] = {0.229, 0.224, 0.225};
constexpr int IGNORE = 255;

// [1,C,h,w] uint8 with the strides torchvision sees: a numpy HWC array permuted to CHW (channels last)
at::Tensor planar(const Image& img) {
  auto hwc = at::from_blob(const_cast<uint8_t*>(img.pixels.data()), {img.height, img.width, img.channels}, at::kByte);
  return hwc.permute({2, 0, 1}).unsqueeze(0);
}

// torchvision.transforms.v2.functional.resize of a uint8 image: the native uint8 kernel where the CPU
// has AVX2/AVX-512 (as torchvision decides), else float, rounded back to uint8.
at::Tensor resize_image(at::Tensor x, int nh, int nw) {
  if (x.size(2) == nh && x.size(3) == nw) return x;
  auto cap = at::get_cpu_capability();
  bool native = cap == "AVX2" || cap == "AVX512";
  // F.interpolate(mode="bilinear", antialias=True, align_corners=False) with a size is this kernel; ATen's
  // operators directly, not LibTorch's C++ frontend (whose headers tripled this file's compile time)
  if (native) return at::_upsample_bilinear2d_aa(x, {nh, nw}, false);
  return at::_upsample_bilinear2d_aa(x.to(at::kFloat), {nh, nw}, false).round_().to(at::kByte);
}

at::Tensor resize_mask(at::Tensor m, int nh, int nw) {
  if (m.size(2) == nh && m.size(3) == nw) return m;
  return at::upsample_nearest2d(m, {nh, nw});
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
  auto padded = at::empty({3, size, size}, at::kByte);
  for (int c = 0; c < 3; ++c) padded[c].fill_(int(std::nearbyint(MEAN[c] * 255)));
  padded.slice(1, 0, nh).slice(2, 0, nw).copy_(x);
  auto mean = at::tensor(std::vector<float>{float(MEAN[0]), float(MEAN[1]), float(MEAN[2])}).view({3, 1, 1});
  auto std = at::tensor(std::vector<float>{float(STD[0]), float(STD[1]), float(STD[2])}).view({3, 1, 1});
  auto image = (padded.to(at::kFloat) / 255.0).sub_(mean).div_(std);
  at::Tensor m;
  if (mask) {
    auto small = resize_mask(planar(*mask), nh, nw)[0][0];
    m = at::full({size, size}, IGNORE, at::kByte);
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
    ms.push_back((t.mask == 1).to(at::kFloat));
  }
  auto q = eval_transform(query, nullptr, size);
  Episode e;
  e.query = q.image.unsqueeze(0).contiguous();
  e.support = at::stack(xs).unsqueeze(0).contiguous();
  e.support_mask = at::stack(ms).unsqueeze(0).contiguous();
  e.valid_h = q.nh, e.valid_w = q.nw, e.height = query.height, e.width = query.width;
  return e;
}

// pipeline/evaluate.py predict_original
at::Tensor mask_of(const at::Tensor& logits, const Episode& e) {
  auto crop = logits.slice(1, 0, e.valid_h).slice(2, 0, e.valid_w).unsqueeze(0).to(at::kFloat);
  auto up = at::upsample_bilinear2d(crop, {e.height, e.width}, true);
  return (up[0][1] > up[0][0]).to(at::kByte).contiguous();   // argmax of 2 channels, ties to 0
}

}  // namespace svf_fss
