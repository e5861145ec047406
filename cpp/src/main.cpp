// svf_fss_predict: segment query images given k support images and their masks, as serving.predict does.
//
//   svf_fss_predict --model models/fold0/1shot/model.pt2 --support s1.png --mask m1.png [--support ... --mask ...]
//                   --query q1.png [q2.png ...] --out predictions/ [--backend aoti|tensorrt] [--size S]
//                   [--mask-threshold 0.5] [--repeat N]
// Writes <out>/<query name>.png (0 background, 255 object, at the query's resolution). --repeat N times
// the model call N times per query after a warm-up and prints the median (ms per episode).
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "svf_fss/svf_fss.h"

namespace fs = std::filesystem;

namespace {

const char* USAGE =
    "usage: svf_fss_predict --model <model.pt2|model.engine> --support <image> --mask <mask> [--support .. --mask ..]\n"
    "                       --query <image> [<image> ...] --out <folder> [--backend aoti|tensorrt] [--size S]\n"
    "                       [--mask-threshold t] [--repeat N]\n";

[[noreturn]] void fail(const std::string& msg) {
  std::cerr << "svf_fss_predict: " << msg << "\n" << USAGE;
  std::exit(2);
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
  int size = 0, repeat = 0;
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
      else if (a == "--mask-threshold") threshold = std::stod(value());
      else if (a == "--size") size = std::stoi(value());
      else if (a == "--repeat") repeat = std::stoi(value());
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
    std::vector<double> model_ms, total_ms;
    for (const auto& q : queries) {
      auto t0 = std::chrono::steady_clock::now();
      auto episode = svf_fss::make_episode(svf_fss::read_image(q), simg, smask, net->size);
      auto logits = net->run(episode.query, episode.support, episode.support_mask);
      auto mask = svf_fss::mask_of(logits[0], episode);
      svf_fss::Image png{episode.height, episode.width, 1, {}};
      auto m = (mask * 255).contiguous();
      png.pixels.assign(m.data_ptr<uint8_t>(), m.data_ptr<uint8_t>() + m.numel());
      auto path = (fs::path(out) / fs::path(q).stem()).string() + ".png";
      svf_fss::write_png(path, png);
      total_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      std::cout << q << ": " << mask.sum().item<int64_t>() << " object pixels -> " << path << "\n";
      for (int r = 0; r < repeat + (repeat > 0); ++r) {   // one warm-up call, then the timed ones
        auto t = std::chrono::steady_clock::now();
        net->run(episode.query, episode.support, episode.support_mask);
        if (r > 0) model_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count());
      }
    }
    std::cout << queries.size() << " queries, " << supports.size() << " shots, backend " << net->name() << ", input "
              << net->size << "x" << net->size << "; end to end median " << median_ms(total_ms) << " ms per query";
    if (!model_ms.empty()) std::cout << "; model median " << median_ms(model_ms) << " ms per episode";
    std::cout << "\n";
  } catch (const c10::Error& e) {
    std::cerr << "svf_fss_predict: " << e.msg() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "svf_fss_predict: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
