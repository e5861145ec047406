// svf_fss_predict: segment query images given k support images and their masks, as serving.predict does.
//
//   svf_fss_predict --model models/fold0/1shot/model.pt2 --support s1.png --mask m1.png [--support ... --mask ...]
//                   --query q1.png [q2.png ...] --out predictions/ [--backend aoti|tensorrt] [--size S]
//                   [--mask-threshold 0.5] [--repeat N] [--threads auto|N]
// Writes <out>/<query name>.png (0 background, 255 object, at the query's resolution): every mask or none,
// as serving.predict (all go to a temporary folder inside <out>, renamed into place once every query has
// succeeded and every destination is free: one taken by a folder, or a file that is not writable, refuses the run
// before any mask is replaced; any failed read or write exits 1 and leaves <out> as it was). --repeat N times the
// model call N times per query after a warm-up and prints the median (ms per episode). --threads auto (the
// default) sizes LibTorch's threads before each query to the cores other processes leave free (cpp/src/threads.cpp).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <unistd.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "svf_fss/svf_fss.h"

namespace fs = std::filesystem;

namespace {

const char* USAGE =
    "usage: svf_fss_predict --model <model.pt2|model.engine> --support <image> --mask <mask> [--support .. --mask ..]\n"
    "                       --query <image> [<image> ...] --out <folder> [--backend aoti|tensorrt] [--size S]\n"
    "                       [--mask-threshold t] [--repeat N] [--threads auto|N]\n";

[[noreturn]] void fail(const std::string& msg) {
  std::cerr << "svf_fss_predict: " << msg << "\n" << USAGE;
  std::exit(2);
}

// The whole text as a number in [lo, hi], or a usage error naming the option.
long long whole_number(const std::string& option, const std::string& text, long long lo, long long hi) {
  size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty() || v < lo || v > hi)
    fail(option + " needs a whole number from " + std::to_string(lo) + " to " + std::to_string(hi) + ", got " + text);
  return v;
}

double fraction(const std::string& option, const std::string& text) {
  size_t used = 0;
  double v = NAN;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty() || !(v > 0 && v < 1))
    fail(option + " needs a number between 0 and 1 (the fraction of white from which a mask pixel is object), got " +
         text);
  return v;
}

double median_ms(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[(v.size() - 1) / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string model, backend, out;
  std::vector<std::string> supports, masks, queries;
  double threshold = -1;
  int size = 0, repeat = 0, threads = 0;   // 0: auto
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc || std::string(argv[i + 1]).rfind("--", 0) == 0) fail(a + " needs a value");
      return argv[++i];
    };
    try {
      if (a == "--model") model = value();
      else if (a == "--backend") backend = value();
      else if (a == "--out") out = value();
      else if (a == "--support") supports.push_back(value());
      else if (a == "--mask") masks.push_back(value());
      else if (a == "--mask-threshold") threshold = fraction(a, value());
      else if (a == "--size") size = int(whole_number(a, value(), 1, 8192));
      else if (a == "--repeat") repeat = int(whole_number(a, value(), 0, 1000000));
      else if (a == "--threads") {
        auto v = value();
        threads = v == "auto" ? 0 : int(whole_number(a, v, 1, 1024));
      }
      else if (a == "--query") {
        queries.push_back(value());
        while (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) queries.push_back(argv[++i]);
      } else if (a == "--help" || a == "-h") {
        std::cout << USAGE;
        return 0;
      } else fail("unknown argument " + a);
    } catch (const std::invalid_argument&) {
      fail(a + " needs a number");
    }
  }
  if (model.empty() || out.empty() || queries.empty() || supports.empty())
    fail("--model, --support, --mask, --query and --out are required");
  if (supports.size() != masks.size())
    fail(std::to_string(supports.size()) + " --support but " + std::to_string(masks.size()) + " --mask");
  auto ext = fs::path(model).extension();
  if (ext == ".onnx")
    fail(model + " is an ONNX graph; this program runs the AOTInductor package (aoti/model.pt2 beside it) or a "
                 "TensorRT engine (model.engine)");
  if (backend.empty()) backend = ext == ".engine" ? "tensorrt" : "aoti";
  if (!fs::exists(model)) fail(model + " does not exist; the export stage writes it (`dvc repro`)");
  std::set<std::string> stems;
  for (const auto& q : queries)
    if (!stems.insert(fs::path(q).stem().string()).second)
      fail("two queries are named " + fs::path(q).stem().string() + ": both masks would be " +
           (fs::path(out) / fs::path(q).stem()).string() + ".png; rename one");
  fs::path tmp;
  size_t replaced = 0;
  // Every mask or none: a destination that rename() cannot take, or that is write-protected, is refused before
  // any is replaced (checked before the queries run, and again just before the renames).
  auto check_destinations = [&] {
    for (const auto& q : queries) {
      auto path = fs::path(out) / (fs::path(q).stem().string() + ".png");
      if (fs::is_directory(fs::symlink_status(path)))
        throw std::runtime_error(path.string() + " is a folder; the mask of " + q + " cannot replace it");
      if (fs::exists(fs::symlink_status(path)) && access(path.c_str(), W_OK) != 0)
        throw std::runtime_error(path.string() + " is not writable; the mask of " + q + " would replace it");
    }
  };
  try {
    std::unique_ptr<svf_fss::Backend> net;
    if (backend == "aoti") net = svf_fss::load_aoti(model);
    else if (backend == "tensorrt") {
      if (size <= 0) fail("--size is needed with --backend tensorrt (the engine's input size, in its .json sidecar)");
      net = svf_fss::load_tensorrt(model, size);
    } else fail("unknown backend " + backend + "; choose aoti or tensorrt");
    std::vector<svf_fss::Image> simg, smask;
    for (size_t i = 0; i < supports.size(); ++i) {
      simg.push_back(svf_fss::read_image(supports[i]));
      smask.push_back(svf_fss::read_mask(masks[i], threshold));
    }
    fs::create_directories(out);
    check_destinations();
    tmp = fs::path(out) / (".svf_fss_predict." + std::to_string(getpid()) + ".tmp");
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    std::vector<std::pair<fs::path, fs::path>> written;   // (temporary, final)
    std::vector<double> model_ms, total_ms;
    std::set<int> used;   // the thread counts the queries ran with
    if (threads > 0) at::set_num_threads(threads);
    for (const auto& q : queries) {
      auto t0 = std::chrono::steady_clock::now();
      if (threads == 0) {
        int n = svf_fss::fair_threads();
        if (n != at::get_num_threads()) at::set_num_threads(n);
      }
      used.insert(at::get_num_threads());
      auto episode = svf_fss::make_episode(svf_fss::read_image(q), simg, smask, net->size);
      auto logits = net->run(episode.query, episode.support, episode.support_mask);
      auto mask = svf_fss::mask_of(logits[0], episode);
      svf_fss::Image png{episode.height, episode.width, 1, {}};
      auto m = (mask * 255).contiguous();
      png.pixels.assign(m.data_ptr<uint8_t>(), m.data_ptr<uint8_t>() + m.numel());
      auto path = (fs::path(out) / fs::path(q).stem()).string() + ".png";
      auto part = tmp / (fs::path(q).stem().string() + ".png");
      svf_fss::write_png(part.string(), png);
      written.emplace_back(part, path);
      total_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      std::cout << q << ": " << mask.sum().item<int64_t>() << " object pixels -> " << path << "\n";
      for (int r = 0; r < repeat + (repeat > 0); ++r) {   // one warm-up call, then the timed ones
        auto t = std::chrono::steady_clock::now();
        net->run(episode.query, episode.support, episode.support_mask);
        if (r > 0) model_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count());
      }
    }
    check_destinations();
    for (const auto& [part, path] : written) {   // every query succeeded: all at once
      fs::rename(part, path);
      ++replaced;
    }
    fs::remove_all(tmp);
    std::cout << queries.size() << " queries, " << supports.size() << " shots, backend " << net->name() << ", input "
              << net->size << "x" << net->size << "; end to end median " << median_ms(total_ms) << " ms per query";
    if (!model_ms.empty()) std::cout << "; model median " << median_ms(model_ms) << " ms per episode";
    std::cout << "; threads " << (threads ? "" : "auto ") << *used.begin();
    if (used.size() > 1) std::cout << "-" << *used.rbegin();
    std::cout << "\n";
    return 0;
  } catch (const c10::Error& e) {
    std::cerr << "svf_fss_predict: " << e.msg() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "svf_fss_predict: " << e.what() << "\n";
  }
  std::error_code ignored;
  if (!tmp.empty()) fs::remove_all(tmp, ignored);
  if (replaced) std::cerr << "svf_fss_predict: " << replaced << " of " << queries.size() << " masks replaced in " << out
                         << " before the failure\n";
  else if (!tmp.empty()) std::cerr << "svf_fss_predict: nothing written to " << out << "\n";
  return 1;
}
