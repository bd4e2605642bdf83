// dbc_fast::largest_box: one bounding box per localisation map, the box of its largest region.
//
// Semantics (equal to clovaai/wsolevaluation's compute_bboxes_from_scoremaps with one threshold and
// multi_contour_eval=False, i.e. to dbc_fast.metrics' box extraction on the same map):
//   1. min-max normalise the map in double precision (as dbc_fast.metrics.normalize_map does in float64):
//      (m - min) / (max - min); a map with a NaN or with max == min becomes all zeros;
//   2. quantise: q = uint8(trunc(255 * normalised));
//   3. foreground: q > int(threshold * max(q)) (cv2.threshold THRESH_BINARY);
//   4. regions: 8-connected components of the foreground (= the outer contours of cv2.findContours);
//   5. "largest" = the largest area of the outer contour polygon (cv2.contourArea of the contour traced
//      through the border pixels' centres, NOT the pixel count); ties go to the region whose first pixel
//      comes last in raster order (the order cv2.findContours lists its top-level contours, and Python's
//      max() keeps the first of equal keys);
//   6. box [x0, y0, x1, y1] = (x, y, min(x + w, W - 1), min(y + h, H - 1)) with (x, y, w, h) the region's
//      bounding rectangle (wsolevaluation's convention: x1, y1 are one past the last pixel unless clipped);
//      no foreground at all gives [0, 0, 0, 0].
// Contours of holes (RETR_TREE lists them too) never win: a hole's polygon lies inside its region's outer
// polygon, and a region inside a hole has a smaller area than the region around it.
//
// CPU kernel: images in parallel. CUDA tensors: a CPU fallback (maps are copied to the host, boxes are
// copied back to the maps' device); the work is a few sequential passes over an H x W mask per image.
// Meta kernel: shape [n, 4] int64, with symbolic sizes, so torch.export / AOTInductor trace the op.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"

namespace dbc_fast {
namespace {

// OpenCV chain-code directions (x right, y down); a higher index turns counterclockwise on screen.
constexpr int kDx[8] = {1, 1, 0, -1, -1, -1, 0, 1};
constexpr int kDy[8] = {0, -1, -1, -1, 0, 1, 1, 1};

struct Region {
  int64_t twice_area = -1;  // twice the contour polygon's area (exact integer)
  int x0 = 0, y0 = 0, x1 = 0, y1 = 0;  // inclusive pixel bounds
};

// Twice the area of the outer contour of the 8-connected region whose first pixel in raster order is
// (r, c), traced as Suzuki & Abe's border following does it (as cv2.findContours does).
int64_t outer_contour_twice_area(const uint8_t* fg, int H, int W, int r, int c) {
  auto on = [&](int y, int x) { return y >= 0 && y < H && x >= 0 && x < W && fg[y * W + x]; };
  // Step 1: clockwise from the left neighbour (direction 4) for the first foreground neighbour.
  int first_dir = -1;
  for (int k = 0; k < 8; ++k) {
    int d = (4 - k + 8) % 8;
    if (on(r + kDy[d], c + kDx[d])) {
      first_dir = d;
      break;
    }
  }
  if (first_dir < 0) return 0;  // a single pixel
  const int y1st = r + kDy[first_dir], x1st = c + kDx[first_dir];
  int cy = r, cx = c, back_dir = first_dir;
  int64_t twice_area = 0;
  while (true) {
    // Step 2: counterclockwise from the neighbour after the one we came from.
    int d = back_dir, ny = cy, nx = cx;
    for (int k = 1; k <= 8; ++k) {
      d = (back_dir + k) % 8;
      ny = cy + kDy[d];
      nx = cx + kDx[d];
      if (on(ny, nx)) break;
    }
    twice_area += static_cast<int64_t>(cx) * ny - static_cast<int64_t>(nx) * cy;  // shoelace term
    if (ny == r && nx == c && cy == y1st && cx == x1st) break;
    back_dir = (d + 4) % 8;
    cy = ny;
    cx = nx;
  }
  return twice_area < 0 ? -twice_area : twice_area;
}

// Box of one H x W map (row-major), written to out[0..3].
template <typename scalar_t>
void largest_box_one(const scalar_t* map, int H, int W, double threshold, std::vector<uint8_t>& fg,
                     std::vector<int>& stack, std::vector<int32_t>& label, int64_t* out) {
  const int64_t N = static_cast<int64_t>(H) * W;
  out[0] = out[1] = out[2] = out[3] = 0;
  double mn = std::numeric_limits<double>::infinity(), mx = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < N; ++i) {
    double v = static_cast<double>(map[i]);
    if (std::isnan(v)) return;  // wsolevaluation zeroes such maps: nothing above any threshold
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  if (!(mx > mn)) return;  // constant map: all zeros
  const double range = mx - mn;
  int max_q = 0;
  fg.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    double scaled = ((static_cast<double>(map[i]) - mn) / range) * 255.0;
    int q = static_cast<int>(static_cast<uint8_t>(scaled));  // numpy astype(uint8): truncation
    fg[i] = static_cast<uint8_t>(q);
    max_q = q > max_q ? q : max_q;
  }
  const int thresh = static_cast<int>(threshold * static_cast<double>(max_q));
  for (int64_t i = 0; i < N; ++i) fg[i] = fg[i] > thresh ? 1 : 0;

  label.assign(N, 0);
  Region best;
  for (int r = 0; r < H; ++r) {
    for (int c = 0; c < W; ++c) {
      const int64_t start = static_cast<int64_t>(r) * W + c;
      if (!fg[start] || label[start]) continue;
      // A new region; (r, c) is its first pixel in raster order. Flood fill for its bounds.
      Region region;
      region.x0 = region.x1 = c;
      region.y0 = region.y1 = r;
      label[start] = 1;
      stack.clear();
      stack.push_back(static_cast<int>(start));
      while (!stack.empty()) {
        const int p = stack.back();
        stack.pop_back();
        const int py = p / W, px = p % W;
        region.x0 = px < region.x0 ? px : region.x0;
        region.x1 = px > region.x1 ? px : region.x1;
        region.y1 = py > region.y1 ? py : region.y1;
        for (int d = 0; d < 8; ++d) {
          const int ny = py + kDy[d], nx = px + kDx[d];
          if (ny < 0 || ny >= H || nx < 0 || nx >= W) continue;
          const int q = ny * W + nx;
          if (fg[q] && !label[q]) {
            label[q] = 1;
            stack.push_back(q);
          }
        }
      }
      region.twice_area = outer_contour_twice_area(fg.data(), H, W, r, c);
      if (region.twice_area >= best.twice_area) best = region;  // ties: the later region wins
    }
  }
  if (best.twice_area < 0) return;  // no foreground
  out[0] = best.x0;
  out[1] = best.y0;
  out[2] = std::min<int64_t>(best.x1 + 1, W - 1);
  out[3] = std::min<int64_t>(best.y1 + 1, H - 1);
}

void check_maps(const at::Tensor& maps, double threshold) {
  TORCH_CHECK(maps.dim() == 3, "dbc_fast::largest_box wants maps [n, H, W], got ", maps.dim(),
              " dimensions (shape ", maps.sizes(), ")");
  TORCH_CHECK(at::isFloatingType(maps.scalar_type()), "dbc_fast::largest_box wants floating-point maps, got ",
              maps.scalar_type());
  TORCH_CHECK(std::isfinite(threshold), "dbc_fast::largest_box: threshold must be finite, got ", threshold);
}

at::Tensor largest_box_cpu(const at::Tensor& maps, double threshold) {
  check_maps(maps, threshold);
  TORCH_CHECK(maps.device().is_cpu(), "largest_box_cpu got a ", maps.device(), " tensor");
  const int64_t n = maps.size(0);
  const int H = static_cast<int>(maps.size(1)), W = static_cast<int>(maps.size(2));
  auto boxes = at::zeros({n, 4}, maps.options().dtype(at::kLong));
  if (n == 0 || H == 0 || W == 0) return boxes;
  const at::Tensor contiguous = maps.contiguous();
  int64_t* out = boxes.data_ptr<int64_t>();
  DBC_FAST_DISPATCH_FLOATING_TYPES(contiguous.scalar_type(), "largest_box", [&] {
    const scalar_t* data = contiguous.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> fg;
      std::vector<int> stack;
      std::vector<int32_t> label;
      for (int64_t i = begin; i < end; ++i) {
        largest_box_one<scalar_t>(data + i * H * W, H, W, threshold, fg, stack, label, out + i * 4);
      }
    });
  });
  return boxes;
}

// CUDA tensors: the CPU kernel on a host copy (documented fallback; no CUDA kernel for this op).
at::Tensor largest_box_device_fallback(const at::Tensor& maps, double threshold) {
  check_maps(maps, threshold);
  return largest_box_cpu(maps.to(at::kCPU), threshold).to(maps.device());
}

at::Tensor largest_box_meta(const at::Tensor& maps, double threshold) {
  check_maps(maps, threshold);
  return at::empty_symint({maps.sym_size(0), c10::SymInt(4)}, maps.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dbc_fast, m) {
  m.def("largest_box(Tensor maps, float threshold) -> Tensor");
}

TORCH_LIBRARY_IMPL(dbc_fast, CPU, m) { m.impl("largest_box", &largest_box_cpu); }
TORCH_LIBRARY_IMPL(dbc_fast, CUDA, m) { m.impl("largest_box", &largest_box_device_fallback); }
TORCH_LIBRARY_IMPL(dbc_fast, Meta, m) { m.impl("largest_box", &largest_box_meta); }

}  // namespace dbc_fast
