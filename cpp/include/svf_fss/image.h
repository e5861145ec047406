// svf-fss in C++: image and mask files <-> 8-bit planes (cpp/src/image.cpp), free of LibTorch's headers so
// that it compiles in a second rather than the 11 s ATen's headers take.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

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

}  // namespace svf_fss
