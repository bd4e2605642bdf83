// dbc_infer: localise the object in one image with a model exported by `dbc-fast export`, no Python.
//
//   dbc_infer MODEL IMAGE [--ops OP_LIBRARY] [--class C] [--device cpu|cuda] [--bench ITERS --batch N]
//
// MODEL is a TorchScript file (.ts / .pt) or an AOTInductor package (.pt2). IMAGE is a JPEG or a PNG.
// The exported module calls the op dbc_fast::largest_box, so the op library (dbc_fast/_C.so, see
// `python -c "import dbc_fast.ops; print(dbc_fast.ops.library_path())"`) must be loaded first: --ops PATH,
// or the environment variable DBC_FAST_OPS.
//
// Steps (the same as dbc_fast.export.predict_image in Python, so both print the same result):
//   decode to RGB uint8 -> resize to the model's input size (bilinear, antialias, as torch's
//   F.interpolate) -> round to uint8 -> module(images, classes) -> box scaled to the image's pixels.
// Output: one JSON line {"image", "width", "height", "class", "class_name", "score", "box", "topk"};
// "box" is [x0, y0, x1, y1] in the original image's pixels (see docs/export.md).
// With --bench ITERS the image is repeated --batch N times and a timing JSON line follows.
#include <dlfcn.h>

#include <cstdio>  // before jpeglib.h, which uses FILE without including it
#include <jpeglib.h>
#include <png.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height x width x 3
};

// ---------------------------------------------------------------- image decoding (libjpeg, libpng)

struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
};

void jpeg_error_exit(j_common_ptr info) {
  auto* err = reinterpret_cast<JpegError*>(info->err);
  std::longjmp(err->jump, 1);
}

Image read_jpeg(const std::string& path, const std::vector<uint8_t>& bytes) {
  jpeg_decompress_struct info;
  JpegError err;
  info.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_error_exit;
  Image image;
  if (setjmp(err.jump)) {
    char message[JMSG_LENGTH_MAX];
    (*info.err->format_message)(reinterpret_cast<j_common_ptr>(&info), message);
    jpeg_destroy_decompress(&info);
    throw std::runtime_error(path + ": cannot decode JPEG: " + message);
  }
  jpeg_create_decompress(&info);
  jpeg_mem_src(&info, bytes.data(), bytes.size());
  jpeg_read_header(&info, TRUE);
  if (info.jpeg_color_space == JCS_CMYK || info.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&info);
    throw std::runtime_error(path + ": CMYK JPEGs are not supported; convert the image to RGB");
  }
  info.out_color_space = JCS_RGB;  // grayscale is expanded to RGB as PIL's convert("RGB") does
  jpeg_start_decompress(&info);
  image.width = static_cast<int>(info.output_width);
  image.height = static_cast<int>(info.output_height);
  image.rgb.resize(static_cast<size_t>(image.width) * image.height * 3);
  while (info.output_scanline < info.output_height) {
    JSAMPROW row = image.rgb.data() + static_cast<size_t>(info.output_scanline) * image.width * 3;
    jpeg_read_scanlines(&info, &row, 1);
  }
  jpeg_finish_decompress(&info);
  jpeg_destroy_decompress(&info);
  return image;
}

struct PngReader {
  std::string path;
  const std::vector<uint8_t>* bytes = nullptr;
  size_t offset = 0;
};

void png_read_from_memory(png_structp png, png_bytep out, png_size_t length) {
  auto* reader = static_cast<PngReader*>(png_get_io_ptr(png));
  if (reader->offset + length > reader->bytes->size()) png_error(png, "truncated file");
  std::memcpy(out, reader->bytes->data() + reader->offset, length);
  reader->offset += length;
}

Image read_png(const std::string& path, const std::vector<uint8_t>& bytes) {
  // The low-level API with no gamma or background handling, so the pixels are the file's as PIL's
  // convert("RGB") gives them: palette and gray expanded to RGB, alpha dropped (not composited),
  // 16-bit samples reduced to their high byte.
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  if (!png) throw std::runtime_error(path + ": cannot create a PNG reader");
  png_infop info = png_create_info_struct(png);
  if (!info) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    throw std::runtime_error(path + ": cannot create a PNG reader");
  }
  PngReader reader{path, &bytes, 0};
  Image image;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw std::runtime_error(path + ": cannot decode PNG (corrupt or truncated file)");
  }
  png_set_read_fn(png, &reader, png_read_from_memory);
  png_read_info(png, info);
  const int color = png_get_color_type(png, info);
  if (png_get_bit_depth(png, info) == 16) png_set_strip_16(png);
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) {
    png_set_expand_gray_1_2_4_to_8(png);
    png_set_gray_to_rgb(png);
  }
  png_set_strip_alpha(png);  // also drops a palette's tRNS transparency: no alpha channel is created
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  image.width = static_cast<int>(png_get_image_width(png, info));
  image.height = static_cast<int>(png_get_image_height(png, info));
  if (png_get_rowbytes(png, info) != static_cast<size_t>(image.width) * 3) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw std::runtime_error(path + ": unsupported PNG pixel layout");
  }
  image.rgb.resize(static_cast<size_t>(image.width) * image.height * 3);
  std::vector<png_bytep> rows(image.height);
  for (int y = 0; y < image.height; ++y) rows[y] = image.rgb.data() + static_cast<size_t>(y) * image.width * 3;
  png_read_image(png, rows.data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return image;
}

Image read_image(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error(path + ": cannot open the image file");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  static const uint8_t kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (bytes.size() >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF) return read_jpeg(path, bytes);
  if (bytes.size() >= 8 && std::equal(kPng, kPng + 8, bytes.begin())) return read_png(path, bytes);
  throw std::runtime_error(path + ": not a JPEG or PNG file (unknown signature)");
}

// ---------------------------------------------------------------- the model, either format

struct Model {
  bool is_aoti = false;
  torch::jit::Module script;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> aoti;
  std::map<std::string, std::string> meta;
  torch::Device device = torch::kCPU;

  std::vector<torch::Tensor> run(const torch::Tensor& images, const torch::Tensor& classes) {
    if (is_aoti) return aoti->run({images, classes});
    torch::NoGradGuard no_grad;
    auto out = script.forward({images, classes}).toTuple();
    std::vector<torch::Tensor> tensors;
    for (const auto& value : out->elements()) tensors.push_back(value.toTensor());
    return tensors;
  }
};

const char* kMetaKeys[] = {"img_h", "img_w", "input_dtype", "class_names", "threshold", "topk", "arch", "method",
                           "device"};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

Model load_model(const std::string& path, const std::string& device_override) {
  Model model;
  model.is_aoti = ends_with(path, ".pt2");
  if (model.is_aoti) {
    model.aoti = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
    for (const auto& [key, value] : model.aoti->get_metadata()) {
      if (key.rfind("dbc_fast.", 0) == 0) model.meta[key.substr(9)] = value;
    }
  } else {
    torch::jit::ExtraFilesMap extra;
    for (const char* key : kMetaKeys) extra[std::string("dbc_fast.") + key] = "";
    torch::Device device = device_override.empty() ? torch::Device(torch::kCPU) : torch::Device(device_override);
    model.script = torch::jit::load(path, device, extra);
    model.script.eval();
    for (const auto& [key, value] : extra) {
      if (!value.empty()) model.meta[key.substr(9)] = value;
    }
  }
  for (const char* key : {"img_h", "img_w", "input_dtype", "device"}) {
    if (!model.meta.count(key)) {
      throw std::runtime_error(path + ": not a dbc-fast export (metadata key dbc_fast." + key + " missing)");
    }
  }
  std::string device = model.meta["device"];
  if (!device_override.empty()) {
    if (model.is_aoti && device_override != device) {
      throw std::runtime_error(path + ": this AOTInductor package was compiled for " + device +
                               "; export it again with --device " + device_override);
    }
    device = device_override;
  }
  model.device = torch::Device(device);
  return model;
}

// ---------------------------------------------------------------- helpers

std::string json_string(const std::string& s) {
  std::ostringstream out;
  out << '"';
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out << '\\' << c;
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out << buf;
    } else {
      out << c;
    }
  }
  out << '"';
  return out.str();
}

std::string fixed(double value, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, value);
  return buf;
}

std::vector<std::string> split_lines(const std::string& s) {
  std::vector<std::string> lines;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

void load_op_library(const std::string& path) {
  // RTLD_GLOBAL: the library registers dbc_fast::largest_box with the dispatcher of this process's libtorch.
  if (!dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
    throw std::runtime_error("cannot load the op library " + path + ": " + dlerror());
  }
}

[[noreturn]] void usage(const std::string& problem) {
  std::cerr << "dbc_infer: " << problem << "\n"
            << "usage: dbc_infer MODEL IMAGE [--ops OP_LIBRARY] [--class C] [--device cpu|cuda]"
               " [--bench ITERS] [--batch N]\n";
  std::exit(2);
}

int parse_int(const std::string& flag, const std::string& value) {
  try {
    size_t used = 0;
    int parsed = std::stoi(value, &used);
    if (used == value.size()) return parsed;
  } catch (const std::exception&) {
  }
  usage(flag + " wants an integer, got '" + value + "'");
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  std::string ops = std::getenv("DBC_FAST_OPS") ? std::getenv("DBC_FAST_OPS") : "";
  std::string device_override;
  int given_class = -1, bench_iters = 0, batch = 1;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--ops") {
      ops = value();
    } else if (arg == "--class") {
      given_class = parse_int(arg, value());
    } else if (arg == "--device") {
      device_override = value();
    } else if (arg == "--bench") {
      bench_iters = parse_int(arg, value());
    } else if (arg == "--batch") {
      batch = parse_int(arg, value());
    } else if (arg == "-h" || arg == "--help") {
      usage("help");
    } else if (arg.rfind("--", 0) == 0) {
      usage("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 2) usage("want MODEL and IMAGE");
  if (batch < 1 || bench_iters < 0) usage("--batch must be >= 1 and --bench >= 0");
  const std::string model_path = positional[0], image_path = positional[1];

  try {
    if (!ops.empty()) load_op_library(ops);
    if (!c10::Dispatcher::singleton().findSchema({"dbc_fast::largest_box", ""}).has_value()) {
      throw std::runtime_error(
          "the op dbc_fast::largest_box is not registered: pass --ops with the op library "
          "(python -c \"import dbc_fast.ops; print(dbc_fast.ops.library_path())\")");
    }
    Model model = load_model(model_path, device_override);
    const int img_h = std::stoi(model.meta["img_h"]), img_w = std::stoi(model.meta["img_w"]);
    const std::vector<std::string> class_names = split_lines(model.meta["class_names"]);

    Image image = read_image(image_path);
    auto pixels = torch::from_blob(image.rgb.data(), {image.height, image.width, 3}, torch::kUInt8);
    auto resized = torch::nn::functional::interpolate(
        pixels.permute({2, 0, 1}).unsqueeze(0).to(torch::kFloat32),
        torch::nn::functional::InterpolateFuncOptions()
            .size(std::vector<int64_t>{img_h, img_w})
            .mode(torch::kBilinear)
            .align_corners(false)
            .antialias(true));
    auto input = resized.round().clamp(0, 255).to(torch::kUInt8);
    if (model.meta["input_dtype"] == "float32") input = input.to(torch::kFloat32);
    input = input.expand({batch, 3, img_h, img_w}).contiguous().to(model.device);
    auto classes = torch::full({batch}, given_class, torch::dtype(torch::kLong).device(model.device));

    auto outputs = model.run(input, classes);
    if (outputs.size() != 7) {
      throw std::runtime_error(model_path + ": the model returned " + std::to_string(outputs.size()) +
                               " outputs, a dbc-fast export returns 7");
    }
    // logits, top_probs, top_classes, maps, boxes, box_classes, box_scores
    auto top_probs = outputs[1][0].to(torch::kCPU), top_classes = outputs[2][0].to(torch::kCPU);
    auto box = outputs[4][0].to(torch::kCPU);
    const int64_t cls = outputs[5][0].item<int64_t>();
    const double score = outputs[6][0].item<double>();
    const double sx = static_cast<double>(image.width) / img_w, sy = static_cast<double>(image.height) / img_h;

    std::ostringstream line;
    line << "{\"image\": " << json_string(image_path) << ", \"width\": " << image.width
         << ", \"height\": " << image.height << ", \"class\": " << cls << ", \"class_name\": "
         << (cls >= 0 && cls < static_cast<int64_t>(class_names.size()) ? json_string(class_names[cls]) : "null")
         << ", \"score\": " << fixed(score, 6) << ", \"box\": [" << fixed(box[0].item<int64_t>() * sx, 3) << ", "
         << fixed(box[1].item<int64_t>() * sy, 3) << ", " << fixed(box[2].item<int64_t>() * sx, 3) << ", "
         << fixed(box[3].item<int64_t>() * sy, 3) << "], \"topk\": [";
    for (int64_t k = 0; k < top_classes.size(0); ++k) {
      line << (k ? ", " : "") << "[" << top_classes[k].item<int64_t>() << ", "
           << fixed(top_probs[k].item<double>(), 6) << "]";
    }
    line << "]}";
    std::cout << line.str() << std::endl;

    if (bench_iters > 0) {
      auto sync = [&] {
        if (model.device.is_cuda()) torch::cuda::synchronize();
      };
      for (int i = 0; i < 3; ++i) model.run(input, classes);  // warm-up
      sync();
      std::vector<double> times;
      for (int i = 0; i < bench_iters; ++i) {
        auto start = std::chrono::steady_clock::now();
        model.run(input, classes);
        sync();
        times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
      }
      std::sort(times.begin(), times.end());
      const double median = times[times.size() / 2];
      std::cout << "{\"bench\": true, \"batch\": " << batch << ", \"iters\": " << bench_iters
                << ", \"median_ms\": " << fixed(median, 3) << ", \"min_ms\": " << fixed(times.front(), 3)
                << ", \"images_per_s\": " << fixed(batch * 1000.0 / median, 2) << "}" << std::endl;
    }
  } catch (const std::exception& error) {
    std::cerr << "dbc_infer: " << error.what() << std::endl;
    return 1;
  }
  return 0;
}
