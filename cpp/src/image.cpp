// Image and mask files <-> 8-bit planes, with the rules of serving/inputs.py (Pillow on the Python side).
#include <algorithm>
#include <cerrno>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <memory>
#include <set>
#include <stdexcept>

#include <png.h>
#ifdef SVF_FSS_JPEG
#include <jpeglib.h>
#endif

#include "svf_fss/image.h"

namespace svf_fss {
namespace {

// The cap of serving.predict (serving/predict.py MAX_PIXELS), checked on the declared size before any
// allocation: a 69-byte PNG may declare 65535 x 65535.
constexpr uint64_t MAX_PIXELS = uint64_t(8192) * 8192;

void check_pixels(const std::string& path, uint64_t width, uint64_t height) {
  if (width == 0 || height == 0 || width * height > MAX_PIXELS)
    throw std::runtime_error(path + " declares " + std::to_string(width) + "x" + std::to_string(height) + " = " +
                             std::to_string(width * height) + " pixels; the limit is " + std::to_string(MAX_PIXELS) +
                             " (8192 x 8192, as serving.predict)");
}

struct File {
  FILE* f;
  explicit File(const std::string& path, const char* mode) : f(std::fopen(path.c_str(), mode)) {
    if (!f) throw std::runtime_error(path + ": cannot open (" + std::strerror(errno) + ")");
  }
  ~File() { std::fclose(f); }
};

// A decoded PNG before any reduction: values as stored (16-bit kept), palette expanded when asked.
struct Raw {
  int height = 0, width = 0, channels = 0, color_type = 0, bit_depth = 8;
  std::vector<uint16_t> v;   // rows of width * channels
};

bool is_png(const std::string& path) {
  File file(path, "rb");
  unsigned char sig[8] = {0};
  return std::fread(sig, 1, 8, file.f) == 8 && png_sig_cmp(sig, 0, 8) == 0;
}

bool is_jpeg(const std::string& path) {
  File file(path, "rb");
  unsigned char sig[3] = {0};
  return std::fread(sig, 1, 3, file.f) == 3 && sig[0] == 0xFF && sig[1] == 0xD8 && sig[2] == 0xFF;
}

// libpng's errors end the read with their message; its warnings are dropped, except a damaged zlib stream
// found after the last row (libpng checks the rest of the image data "benignly"): refused, as serving/inputs.py
// check_png refuses it. Data beyond the declared rows are ignored, here and there.
void on_png_error(png_structp png, png_const_charp msg) {
  *static_cast<std::string*>(png_get_error_ptr(png)) = msg;
  png_longjmp(png, 1);
}

void on_png_warning(png_structp png, png_const_charp msg) {
  std::string m = msg;
  if (m.rfind("IDAT: ", 0) == 0 && m != "IDAT: Extra compressed data" && m != "IDAT: Too much image data")
    png_error(png, msg);
}

// mask=false: palette -> RGB(A); mask=true: palette indices kept, except that a palette with
// transparency is expanded so that its alpha can be read (as Pillow converts it to RGBA).
// Integrity as serving/inputs.py check_png: a wrong CRC in any chunk up to the image data (ancillary ones
// too, as Pillow) or a damaged zlib stream (its Adler-32 checksum among others) refuses the file.
Raw read_png(const std::string& path, bool mask) {
  File file(path, "rb");
  std::string error;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &error, on_png_error, on_png_warning);
  png_infop info = png_create_info_struct(png);
  Raw raw;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw std::runtime_error(path + ": not a readable PNG (" + error + "; a truncated or damaged file)");
  }
  png_set_crc_action(png, PNG_CRC_DEFAULT, PNG_CRC_ERROR_QUIT);
  png_init_io(png, file.f);
  png_read_info(png, info);
  try {
    check_pixels(path, png_get_image_width(png, info), png_get_image_height(png, info));
  } catch (...) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw;
  }
  raw.color_type = png_get_color_type(png, info);
  raw.bit_depth = png_get_bit_depth(png, info);
  bool trns = png_get_valid(png, info, PNG_INFO_tRNS);
  if (raw.color_type == PNG_COLOR_TYPE_PALETTE && (!mask || trns)) {
    png_set_palette_to_rgb(png);
    if (trns) png_set_tRNS_to_alpha(png);
    raw.color_type = trns ? PNG_COLOR_TYPE_RGBA : PNG_COLOR_TYPE_RGB;
  }
  if (raw.bit_depth < 8) png_set_packing(png);   // one value per byte, not rescaled (palette indices, 1-bit 0/1)
  if (raw.bit_depth == 16) png_set_swap(png);    // host order for the uint16 rows below
  png_read_update_info(png, info);
  raw.height = png_get_image_height(png, info);
  raw.width = png_get_image_width(png, info);
  raw.channels = png_get_channels(png, info);
  int depth = png_get_bit_depth(png, info);
  size_t rowbytes = png_get_rowbytes(png, info);
  std::vector<uint8_t> bytes(rowbytes * raw.height);
  std::vector<png_bytep> rows(raw.height);
  for (int y = 0; y < raw.height; ++y) rows[y] = bytes.data() + y * rowbytes;
  png_read_image(png, rows.data());
  png_destroy_read_struct(&png, &info, nullptr);
  size_t n = size_t(raw.height) * raw.width * raw.channels;
  raw.v.resize(n);
  if (depth == 16) {
    for (size_t y = 0, i = 0; y < size_t(raw.height); ++y) {
      const uint16_t* r = reinterpret_cast<const uint16_t*>(rows[y]);
      for (size_t x = 0; x < size_t(raw.width) * raw.channels; ++x) raw.v[i++] = r[x];
    }
  } else {
    for (size_t y = 0, i = 0; y < size_t(raw.height); ++y)
      for (size_t x = 0; x < size_t(raw.width) * raw.channels; ++x) raw.v[i++] = rows[y][x];
  }
  // Pillow's L: 2- and 4-bit greys scaled to 0..255, for masks too (a 0/3 2-bit mask is black and white, 0/255,
  // as a viewer shows it); a 1-bit mask stays 0/1 (Pillow's mode 1 reads as booleans).
  if (raw.bit_depth < 8 && raw.color_type == PNG_COLOR_TYPE_GRAY && (!mask || raw.bit_depth > 1)) {
    int scale = 255 / ((1 << raw.bit_depth) - 1);
    for (auto& x : raw.v) x = uint16_t(x * scale);
  }
  return raw;
}

#ifdef SVF_FSS_JPEG
struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX] = {0};
  bool too_big = false;
};

// Strict as Pillow: libjpeg's warnings (a truncated file, corrupt data it would paint grey) are errors too.
Image read_jpeg(const std::string& path) {
  File file(path, "rb");
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = [](j_common_ptr c) {
    auto* e = reinterpret_cast<JpegError*>(c->err);
    (*c->err->format_message)(c, e->message);
    std::longjmp(e->jump, 1);
  };
  err.mgr.emit_message = [](j_common_ptr c, int level) {
    if (level < 0) c->err->error_exit(c);   // a warning: stop, as an error
  };
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    throw std::runtime_error(path + ": not a readable JPEG (" + err.message + "; a truncated or damaged file)");
  }
  jpeg_create_decompress(&cinfo);
  jpeg_stdio_src(&cinfo, file.f);
  jpeg_read_header(&cinfo, TRUE);
  if (uint64_t(cinfo.image_width) * cinfo.image_height > MAX_PIXELS || !cinfo.image_width || !cinfo.image_height) {
    uint64_t w = cinfo.image_width, h = cinfo.image_height;
    jpeg_destroy_decompress(&cinfo);
    check_pixels(path, w, h);
  }
  // CMYK (and YCCK) as Pillow reads them: Adobe's inverted CMYK un-inverted, then Pillow's CMYK -> RGB
  bool cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  cinfo.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  Image img{int(cinfo.output_height), int(cinfo.output_width), 3, {}};
  img.pixels.resize(size_t(img.height) * img.width * 3);
  std::vector<uint8_t> four(cmyk ? size_t(img.width) * 4 : 0);
  while (cinfo.output_scanline < cinfo.output_height) {
    size_t y = cinfo.output_scanline;
    JSAMPROW row = cmyk ? four.data() : img.pixels.data() + y * img.width * 3;
    jpeg_read_scanlines(&cinfo, &row, 1);
    if (!cmyk) continue;
    uint8_t* out = img.pixels.data() + y * img.width * 3;
    for (int x = 0; x < img.width; ++x) {
      int v[4];
      for (int c = 0; c < 4; ++c) v[c] = cinfo.saw_Adobe_marker ? 255 - four[x * 4 + c] : four[x * 4 + c];
      int nk = 255 - v[3];
      for (int c = 0; c < 3; ++c) {
        int t = v[c] * nk + 128;
        out[x * 3 + c] = uint8_t(std::clamp(nk - (((t >> 8) + t) >> 8), 0, 255));
      }
    }
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return img;
}
#endif

uint8_t grey_of(uint16_t r, uint16_t g, uint16_t b) {   // Pillow's RGB -> L (ITU-R 601-2, rounded)
  return uint8_t((r * 19595u + g * 38470u + b * 7471u + 0x8000u) >> 16);
}

}  // namespace

Image read_image(const std::string& path) {
  if (!is_png(path)) {
    if (!is_jpeg(path)) throw std::runtime_error(path + ": neither a PNG nor a JPEG (this program reads those two)");
#ifdef SVF_FSS_JPEG
    return read_jpeg(path);
#else
    throw std::runtime_error(path + ": a JPEG, and this build reads PNG only (libjpeg was not found)");
#endif
  }
  Raw raw = read_png(path, false);
  Image img{raw.height, raw.width, 3, {}};
  img.pixels.resize(size_t(img.height) * img.width * 3);
  bool grey = raw.channels <= 2;
  for (size_t p = 0, n = size_t(img.height) * img.width; p < n; ++p) {
    for (int c = 0; c < 3; ++c) {
      uint16_t v = raw.v[p * raw.channels + (grey ? 0 : c)];
      if (raw.bit_depth == 16)   // grey: scaled by 65535 as serving/inputs.py to_rgb8; colour and grey+alpha:
        v = raw.channels == 1 ? uint16_t((v * 255u + 32767u) / 65535u) : uint16_t(v >> 8);   // Pillow's high byte
      img.pixels[p * 3 + c] = uint8_t(v);
    }
  }
  return img;
}

Image read_mask(const std::string& path, double threshold) {
  if (!is_png(path)) throw std::runtime_error(path + ": a mask must be a PNG");
  if (threshold != -1 && !(threshold > 0 && threshold < 1))
    throw std::runtime_error("mask threshold " + std::to_string(threshold) + " is outside (0, 1)");
  Raw raw = read_png(path, true);
  size_t n = size_t(raw.height) * raw.width;
  std::vector<uint16_t> plane(n);
  bool alpha = raw.channels == 2 || raw.channels == 4, used_alpha = false;
  if (alpha) {
    for (size_t p = 0; p < n; ++p) {
      plane[p] = raw.v[p * raw.channels + raw.channels - 1];
      if (plane[p] < (raw.bit_depth == 16 ? 65535 : 255)) used_alpha = true;
    }
    if (used_alpha && raw.bit_depth == 16)
      for (auto& v : plane) v >>= 8;   // Pillow reads 16-bit alpha as 8-bit
  }
  if (!used_alpha) {   // Pillow: colour -> L, 16-bit colour or grey+alpha by its high byte, plain grey as stored
    int shift = raw.bit_depth == 16 && raw.channels > 1 ? 8 : 0;
    for (size_t p = 0; p < n; ++p) {
      const uint16_t* px = &raw.v[p * raw.channels];
      plane[p] = raw.channels >= 3 ? grey_of(px[0] >> shift, px[1] >> shift, px[2] >> shift) : px[0] >> shift;
    }
  }
  bool wide = raw.bit_depth == 16 && raw.channels == 1;   // Pillow's I;16: values kept, white 65535
  std::set<uint16_t> values(plane.begin(), plane.end());
  Image out{raw.height, raw.width, 1, std::vector<uint8_t>(n)};
  auto within = [&](std::initializer_list<uint16_t> allowed) {
    for (auto v : values)
      if (std::find(allowed.begin(), allowed.end(), v) == allowed.end()) return false;
    return true;
  };
  if (values == std::set<uint16_t>{255})
    throw std::runtime_error(path + " holds only the value 255: all ignore in the 0/1/255 encoding, so it marks no "
                                    "object; mark the object 1 (or 255 on a 0 background)");
  if (within({0, 255})) {
    for (size_t p = 0; p < n; ++p) out.pixels[p] = plane[p] == 255;
  } else if (within({0, 1, 255})) {
    for (size_t p = 0; p < n; ++p) out.pixels[p] = uint8_t(plane[p]);
  } else if (threshold != -1) {
    double white = (wide || *values.rbegin() > 255) ? 65535 : 255;
    for (size_t p = 0; p < n; ++p) out.pixels[p] = plane[p] >= threshold * white;
  } else {
    std::string bad;
    int shown = 0;
    for (auto v : values)
      if (v != 0 && v != 1 && v != 255 && shown++ < 5) bad += (bad.empty() ? "" : ", ") + std::to_string(v);
    throw std::runtime_error(path + " is not binary: it holds values [" + bad + "]; use 0/1 (255 = ignore) or "
                             "0/255, or give a threshold (e.g. 0.5) to binarise a JPEG or anti-aliased mask");
  }
  if (std::find(out.pixels.begin(), out.pixels.end(), 1) == out.pixels.end())
    throw std::runtime_error(path + " marks no object pixel (all background); a support must show its object");
  return out;
}

void write_png(const std::string& path, const Image& image) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw std::runtime_error(path + ": cannot create (" + std::strerror(errno) + ")");
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(png);
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    std::fclose(f);
    throw std::runtime_error(path + ": cannot write the PNG");
  }
  struct Closer {   // every byte reached the file, or an error naming why (a full disk among them)
    FILE*& f;
    const std::string& path;
    void close() {
      bool ok = std::fflush(f) == 0 && !std::ferror(f);
      int saved = errno;
      ok = std::fclose(f) == 0 && ok;
      f = nullptr;
      if (!ok) throw std::runtime_error(path + ": writing failed (" + std::strerror(saved ? saved : errno) + ")");
    }
  } closer{f, path};
  png_init_io(png, f);
  int type = image.channels == 1 ? PNG_COLOR_TYPE_GRAY : image.channels == 3 ? PNG_COLOR_TYPE_RGB
                                                                              : PNG_COLOR_TYPE_RGBA;
  png_set_IHDR(png, info, image.width, image.height, 8, type, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int y = 0; y < image.height; ++y)
    png_write_row(png, const_cast<png_bytep>(image.pixels.data() + size_t(y) * image.width * image.channels));
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  closer.close();
}

}  // namespace svf_fss
