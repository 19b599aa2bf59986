// Python bindings of interpolatron._C: each of the four bucket ops of
// interpolatron/backends/base.py takes its Python argument object (CombineArgs,
// GramArgs, RecordArgs, ExtrapArgs) as is, with the bucket's TableCache; the
// scalars are read into the op's struct (ops.h) by name through its field
// list, the tensors validated, and the struct handed whole to the CPU or CUDA
// launcher by device.
//
// Each op returns True when it ran, False when it cannot run this call as is
// (an active tensor is not dense, or a gradient is strided unlike its parameter): the
// Python backend then runs the reference implementation for that call, which
// keeps the ring layout (storage order of each dense tensor) identical between
// backends. Everything else that is wrong raises.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "launchers.h"

namespace py = pybind11;

namespace interp {
namespace {

std::optional<DType> to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: return std::nullopt;
  }
}

DType ring_dtype(const at::Tensor& ring, const char* name) {
  const auto d = to_dtype(ring.scalar_type());
  TORCH_CHECK_TYPE(d.has_value(), name, " has dtype ", ring.scalar_type(),
                   "; interpolatron's C++ kernels support float32, float64, bfloat16 and float16");
  return *d;
}

void check_ring(const at::Tensor& ring, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(ring.dim() == 2, name, " must be a (slots, N) ring buffer, got shape ", ring.sizes());
  TORCH_CHECK_VALUE(ring.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK_VALUE(ring.device() == device, name, " is on ", ring.device(), ", the bucket on ", device);
  TORCH_CHECK_VALUE(ring.size(0) <= cpu::kMaxSlots, name, " has ", ring.size(0),
                    " slots; the C++ kernels take at most ", cpu::kMaxSlots);
}

// A small device tensor (coefs, lr, count) in the dtype the kernels read.
at::Tensor scalar_input(const at::Tensor& t, const char* name, const at::Device& device, at::ScalarType dtype,
                        std::optional<int64_t> numel) {
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), ", the bucket on ", device,
                    " (it must live on the bucket's device so that no host synchronisation is needed)");
  if (numel) TORCH_CHECK_VALUE(t.numel() == *numel, name, " must have ", *numel, " elements, got ", t.numel());
  return t.to(dtype).contiguous().reshape({-1});
}

// GradScaler's grad_scale / found_inf: float32, one element, on the bucket's
// device (read by the kernels, never on the host for CUDA).
std::optional<at::Tensor> scale_input(const std::optional<at::Tensor>& t, const char* name,
                                      const at::Device& device) {
  if (!t) return std::nullopt;
  return scalar_input(*t, name, device, at::kFloat, 1);
}

void check_out(const at::Tensor& out, const char* name, const at::Device& device, int64_t numel) {
  TORCH_CHECK_VALUE(out.device() == device, name, " is on ", out.device(), ", the bucket on ", device);
  TORCH_CHECK_TYPE(out.scalar_type() == at::kDouble, name, " must be float64, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 1 && out.numel() == numel, name, " must have shape (", numel, ",), got ",
                    out.sizes());
}

// The active tensors as segments; nullopt when one is not dense (or a gradient
// is laid out unlike its parameter).
// `dtype`: the segments' dtype (the ring's, or 16-bit with master weights).
std::optional<Segs> make_segs(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>* b,
                                          const std::vector<int64_t>& offsets, const at::Tensor& ring,
                                          const char* what, std::optional<at::ScalarType> seg_dtype = std::nullopt) {
  const at::Device device = ring.device();
  const at::ScalarType dtype = seg_dtype.value_or(ring.scalar_type());
  const int64_t n_cols = ring.size(1);
  TORCH_CHECK_VALUE(offsets.size() == a.size(), "got ", a.size(), " ", what, " but ", offsets.size(), " offsets");
  if (b) TORCH_CHECK_VALUE(b->size() == a.size(), "got ", a.size(), " ", what, " but ", b->size(), " gradients");
  Segs segs;
  segs.reserve(a.size());
  bool contiguous = true;
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor& t = a[i];
    TORCH_CHECK_VALUE(t.device() == device, what, "[", i, "] is on ", t.device(), ", the ring on ", device);
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, what, "[", i, "] has dtype ", t.scalar_type(), ", expected ", dtype,
                     " (the C++ kernels need one dtype per bucket)");
    const int64_t n = t.numel();
    TORCH_CHECK_VALUE(offsets[i] >= 0 && offsets[i] + n <= n_cols, what, "[", i, "] (", n,
                      " elements) at offset ", offsets[i], " does not fit the ring's ", n_cols, " columns");
    // Dense (channels_last too) is enough: elementwise in storage order, the
    // ring's column order (interpolatron/backends/layout.py).
    contiguous &= t.is_non_overlapping_and_dense();
    const void* bp = nullptr;
    if (b) {
      const at::Tensor& g = (*b)[i];
      TORCH_CHECK_VALUE(g.device() == device, "grads[", i, "] is on ", g.device(), ", the ring on ", device);
      TORCH_CHECK_TYPE(g.scalar_type() == dtype, "grads[", i, "] has dtype ", g.scalar_type(), ", its parameter ",
                       dtype);
      TORCH_CHECK_VALUE(g.numel() == n, "grads[", i, "] has ", g.numel(), " elements, its parameter ", n);
      contiguous &= g.is_non_overlapping_and_dense() && (n <= 1 || g.strides() == t.strides());
      bp = n ? g.data_ptr() : nullptr;
    }
    segs.push_back({n ? t.data_ptr() : nullptr, bp, n, offsets[i]});
  }
  if (!contiguous) return std::nullopt;
  return segs;
}

void check_device(const at::Device& d) {
  TORCH_CHECK_VALUE(d.is_cpu() || d.is_cuda(), "interpolatron._C runs on CPU and CUDA tensors, got ", d);
}

// The kernels write through raw pointers; bump the version counters as an
// in-place torch op would, so that autograd still detects a tensor saved for
// backward being modified by a step.
void bump(const at::Tensor& t) { torch::autograd::impl::bump_version(t); }
void bump(const std::vector<at::Tensor>& ts) {
  for (const at::Tensor& t : ts) bump(t);
}

// Master weights (interpolatron/backends/base.py): a flat contiguous float32
// tensor with the ring's columns, float32 rings, 16-bit params and gradients.
// Returns the params' dtype: the ring's without a master.
at::ScalarType check_master(const std::optional<at::Tensor>& master, const at::Tensor& ring,
                            const std::vector<at::Tensor>& params) {
  if (!master) return ring.scalar_type();
  const at::Tensor& m = *master;
  TORCH_CHECK_VALUE(m.scalar_type() == at::kFloat && m.dim() == 1 && m.is_contiguous(),
                    "master must be a contiguous 1-d float32 tensor, got ", m.scalar_type(), " of shape ", m.sizes());
  TORCH_CHECK_VALUE(m.device() == ring.device() && m.numel() == ring.size(1), "master (", m.numel(), " columns on ",
                    m.device(), ") must match the rings (", ring.size(1), " columns on ", ring.device(), ")");
  TORCH_CHECK_VALUE(ring.scalar_type() == at::kFloat, "with master weights the rings are float32, got ",
                    ring.scalar_type());
  const at::ScalarType p = params.empty() ? at::kBFloat16 : params[0].scalar_type();
  TORCH_CHECK_VALUE(p == at::kBFloat16 || p == at::kHalf, "master weights are for 16-bit parameters, got ", p);
  return p;
}

// The optional GradScaler tensors as kernel pointers.
const float* float_ptr(const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

template <typename Op>
using CudaLauncher = void (*)(const Op&, const Segs&, const at::Device&, TableCache&);

// Runs an op on the CPU or CUDA launcher by the bucket's device: the one place
// that knows whether this build has the CUDA kernels (cuda is nullptr if not,
// see INTERP_CUDA_LAUNCHER).
template <typename Op>
void run_on(const at::Device& device, const Op& op, const Segs& segs, TableCache* cache,
            void (*cpu)(const Op&, const Segs&), std::type_identity_t<CudaLauncher<Op>> cuda) {
  if (!device.is_cuda()) {
    cpu(op, segs);
    return;
  }
  TORCH_CHECK(cuda != nullptr,
              "interpolatron._C was built without CUDA kernels; rebuild it where torch has CUDA and nvcc is "
              "on PATH (INTERPOLATRON_FORCE_CUDA=1 makes a build without them fail)");
  TORCH_CHECK_VALUE(cache != nullptr, "CUDA buckets need a TableCache (the backend passes one per op)");
  cuda(op, segs, device, *cache);
}

// The only preprocessor switch on CUDA in the bindings.
#if defined(INTERPOLATRON_WITH_CUDA)
constexpr bool kWithCuda = true;
#define INTERP_CUDA_LAUNCHER(fn) (&(fn))
#else
constexpr bool kWithCuda = false;
#define INTERP_CUDA_LAUNCHER(fn) nullptr
#endif

// ---------------------------------------------------------------------------
// The argument object. Its scalars, by the types of the ops.h field lists,
// converted as Python converts them (float(), bool(); a seed is int() mod
// 2^32, None unset), then the tensors, by attribute name.

void from_python(const py::handle& v, double& out) {
  out = static_cast<double>(py::float_(py::reinterpret_borrow<py::object>(v)));
}

void from_python(const py::handle& v, bool& out) {
  const int truth = PyObject_IsTrue(v.ptr());
  if (truth < 0) throw py::error_already_set();
  out = truth != 0;
}

void from_python(const py::handle& v, Seed& out) {
  if (v.is_none()) {
    out = Seed{};
    return;
  }
  const py::object low = py::int_(py::reinterpret_borrow<py::object>(v)).attr("__and__")(py::int_(0xFFFFFFFFu));
  out = Seed{true, low.cast<uint32_t>()};
}

template <typename Op>
Op scalars_of(const py::handle& args) {
  Op op{};
  for_each_scalar(op, [&](const char* name, auto& field) { from_python(args.attr(name), field); });
  return op;
}

template <typename T>
T attr(const py::handle& args, const char* name) {
  return args.attr(name).cast<T>();
}

using Tensors = std::vector<at::Tensor>;
using OptTensor = std::optional<at::Tensor>;
using Offsets = std::vector<int64_t>;

// The ops: Python reads under the GIL, everything after without it.

bool combine(const py::handle& args, TableCache* cache) {
  CombineOp op = scalars_of<CombineOp>(args);
  const auto params = attr<Tensors>(args, "params");
  const auto grads = attr<Tensors>(args, "grads");
  const auto offsets = attr<Offsets>(args, "offsets");
  const auto x_hist = attr<at::Tensor>(args, "x_hist");
  const auto g_hist = attr<at::Tensor>(args, "g_hist");
  const auto coefs = attr<at::Tensor>(args, "coefs");
  const auto lr = attr<at::Tensor>(args, "lr");
  const auto count = attr<at::Tensor>(args, "count");
  const auto gram = attr<OptTensor>(args, "gram");
  const auto grad_scale = attr<OptTensor>(args, "grad_scale");
  const auto found_inf = attr<OptTensor>(args, "found_inf");
  const auto master = attr<OptTensor>(args, "master");
  const py::gil_scoped_release no_gil;

  const at::Device device = x_hist.device();
  check_device(device);
  check_ring(x_hist, "x_hist", device);
  check_ring(g_hist, "g_hist", device);
  const DType dtype = ring_dtype(x_hist, "x_hist");
  TORCH_CHECK_TYPE(g_hist.scalar_type() == x_hist.scalar_type(), "g_hist has dtype ", g_hist.scalar_type(),
                   ", x_hist ", x_hist.scalar_type());
  TORCH_CHECK_VALUE(g_hist.size(1) == x_hist.size(1), "x_hist has ", x_hist.size(1), " columns, g_hist ",
                    g_hist.size(1));
  const int k = static_cast<int>(coefs.numel());
  TORCH_CHECK_VALUE(k >= 1 && k <= cpu::kMaxSlots, "combine needs 1 <= k <= ", cpu::kMaxSlots, " coefficients, got ",
                    k);
  TORCH_CHECK_VALUE(x_hist.size(0) == k - 1, "x_hist must have k - 1 = ", k - 1, " slots, has ", x_hist.size(0));
  TORCH_CHECK_VALUE(g_hist.size(0) == k - 1, "g_hist must have k - 1 = ", k - 1, " slots, has ", g_hist.size(0));
  if (gram) check_out(*gram, "gram", device, k);
  const at::ScalarType param_type = check_master(master, x_hist, params);
  const auto segs = make_segs(params, &grads, offsets, x_hist, "params", param_type);
  if (!segs) return false;
  // The kernels' copies of the small inputs; alive until the launches are enqueued.
  const at::Tensor coefs64 = scalar_input(coefs, "coefs", device, at::kDouble, std::nullopt);
  const at::Tensor lr64 = scalar_input(lr, "lr", device, at::kDouble, 1);
  const at::Tensor count64 = scalar_input(count, "count", device, at::kLong, 1);
  const auto scale = scale_input(grad_scale, "grad_scale", device);
  const auto inf = scale_input(found_inf, "found_inf", device);
  op.dtype = dtype;
  op.param_dtype = *to_dtype(param_type);
  op.k = k;
  op.x_ring = x_hist.data_ptr();
  op.g_ring = g_hist.data_ptr();
  op.row_elems = x_hist.size(1);
  op.coefs = coefs64.data_ptr<double>();
  op.lr = lr64.data_ptr<double>();
  op.count = count64.data_ptr<int64_t>();
  op.grad_scale = float_ptr(scale);
  op.found_inf = float_ptr(inf);
  op.gram = gram ? gram->data_ptr<double>() : nullptr;
  op.gram_stride = gram ? gram->stride(0) : 0;
  op.master = master ? master->data_ptr<float>() : nullptr;
  run_on(device, op, *segs, cache, &combine_cpu, INTERP_CUDA_LAUNCHER(combine_cuda));
  if (master) bump(*master);
  bump(params);
  bump(x_hist);
  bump(g_hist);
  if (gram) bump(*gram);
  return true;
}

bool gram_row(const py::handle& args, TableCache* cache) {
  GramRowOp op = scalars_of<GramRowOp>(args);
  const auto params = attr<Tensors>(args, "params");
  const auto grads = attr<Tensors>(args, "grads");
  const auto offsets = attr<Offsets>(args, "offsets");
  const auto g_hist = attr<at::Tensor>(args, "g_hist");
  const auto count = attr<at::Tensor>(args, "count");
  const auto out = attr<at::Tensor>(args, "out");
  const auto grad_scale = attr<OptTensor>(args, "grad_scale");
  const auto found_inf = attr<OptTensor>(args, "found_inf");
  const auto master = attr<OptTensor>(args, "master");
  const py::gil_scoped_release no_gil;

  const at::Device device = g_hist.device();
  check_device(device);
  check_ring(g_hist, "g_hist", device);
  const DType dtype = ring_dtype(g_hist, "g_hist");
  const int64_t slots = g_hist.size(0);
  const bool store = op.store;
  TORCH_CHECK_VALUE(!store || slots >= 1, "gram_row with store=True needs a g ring with at least one slot");
  TORCH_CHECK_VALUE(slots + (store ? 0 : 1) <= cpu::kMaxSlots, "gram_row supports at most ", cpu::kMaxSlots,
                    " dots, got ", slots + (store ? 0 : 1));
  check_out(out, "out", device, store ? slots : slots + 1);
  // The gradients are the segments' payload; params are read only for the
  // weight decay, but they must match the gradients one for one.
  TORCH_CHECK_VALUE(!(master && store), "gram_row with store=True takes no master");
  const at::ScalarType param_type = check_master(master, g_hist, params);
  const auto segs = make_segs(params, &grads, offsets, g_hist, "params", param_type);
  if (!segs) return false;
  const at::Tensor count64 = scalar_input(count, "count", device, at::kLong, 1);
  const auto scale = scale_input(grad_scale, "grad_scale", device);
  const auto inf = scale_input(found_inf, "found_inf", device);
  op.dtype = dtype;
  op.param_dtype = *to_dtype(param_type);
  op.master = master ? master->data_ptr<float>() : nullptr;
  op.g_ring = g_hist.data_ptr();
  op.slots = static_cast<int>(slots);
  op.row_elems = g_hist.size(1);
  op.count = count64.data_ptr<int64_t>();
  op.grad_scale = float_ptr(scale);
  op.found_inf = float_ptr(inf);
  op.out = out.data_ptr<double>();
  op.out_stride = out.stride(0);
  run_on(device, op, *segs, cache, &gram_row_cpu, INTERP_CUDA_LAUNCHER(gram_row_cuda));
  if (store) bump(g_hist);
  bump(out);
  return true;
}

bool rna_record(const py::handle& args, TableCache* cache) {
  RecordOp op = scalars_of<RecordOp>(args);
  const auto sources = attr<Tensors>(args, "sources");
  const auto offsets = attr<Offsets>(args, "offsets");
  const auto window = attr<at::Tensor>(args, "window");
  const auto count = attr<at::Tensor>(args, "count");
  const auto out = attr<OptTensor>(args, "out");
  const py::gil_scoped_release no_gil;

  const at::Device device = window.device();
  check_device(device);
  check_ring(window, "window", device);
  const DType dtype = ring_dtype(window, "window");
  const int64_t slots = window.size(0);
  TORCH_CHECK_VALUE(slots >= 1, "rna_record needs a window with at least one slot");
  if (out) check_out(*out, "out", device, slots - 1);
  const auto segs = make_segs(sources, nullptr, offsets, window, "sources");
  if (!segs) return false;
  const at::Tensor count64 = scalar_input(count, "count", device, at::kLong, 1);
  op.dtype = dtype;
  op.window = window.data_ptr();
  op.slots = static_cast<int>(slots);
  op.row_elems = window.size(1);
  op.count = count64.data_ptr<int64_t>();
  op.out = out ? out->data_ptr<double>() : nullptr;
  op.out_stride = out ? out->stride(0) : 0;
  run_on(device, op, *segs, cache, &rna_record_cpu, INTERP_CUDA_LAUNCHER(rna_record_cuda));
  bump(window);
  if (out) bump(*out);
  return true;
}

bool rna_extrapolate(const py::handle& args, TableCache* cache) {
  ExtrapOp op = scalars_of<ExtrapOp>(args);
  const auto window = attr<at::Tensor>(args, "window");
  const auto offsets = attr<Offsets>(args, "offsets");
  const auto count = attr<at::Tensor>(args, "count");
  const auto coefs = attr<at::Tensor>(args, "coefs");
  const auto outs = attr<Tensors>(args, "outs");
  const py::gil_scoped_release no_gil;

  const at::Device device = window.device();
  check_device(device);
  check_ring(window, "window", device);
  const DType dtype = ring_dtype(window, "window");
  const int64_t slots = window.size(0);
  const int64_t m = coefs.numel();
  TORCH_CHECK_VALUE(m >= 1 && m <= slots, "rna_extrapolate needs 1 <= coefs.numel() <= ", slots,
                    " (the window's slots), got ", m);
  const auto segs = make_segs(outs, nullptr, offsets, window, "outs");
  if (!segs) return false;
  const at::Tensor count64 = scalar_input(count, "count", device, at::kLong, 1);
  const at::Tensor coefs64 = scalar_input(coefs, "coefs", device, at::kDouble, std::nullopt);
  op.dtype = dtype;
  op.window = window.data_ptr();
  op.slots = static_cast<int>(slots);
  op.row_elems = window.size(1);
  op.m = static_cast<int>(m);
  op.coefs = coefs64.data_ptr<double>();
  op.count = count64.data_ptr<int64_t>();
  run_on(device, op, *segs, cache, &rna_extrapolate_cpu, INTERP_CUDA_LAUNCHER(rna_extrapolate_cuda));
  bump(outs);
  return true;
}

// The scalars' attribute names of an op, in field-list order.
template <typename Op>
py::tuple scalar_names() {
  py::list names;
  for_each_scalar(Op{}, [&](const char* name, const auto&) { names.append(name); });
  return py::tuple(names);
}

}  // namespace
}  // namespace interp

#ifndef INTERPOLATRON_CUDA_SKIPPED
// Why the CUDA kernels are absent, as a code setup.py passes in (see
// interpolatron/backends/native_backend.py for the wording). 0: they are built.
#define INTERPOLATRON_CUDA_SKIPPED 0
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "interpolatron's C++/CUDA kernels for the four bucket ops (see interpolatron/backends/base.py)";

  py::class_<interp::TableCache>(m, "TableCache",
                                 "Device-side pointer tables of one op of one bucket (CUDA), reused while the "
                                 "tensors' storages stay the same.")
      .def(py::init<>())
      .def_property_readonly("uploads", [](const interp::TableCache& c) { return c.uploads; })
      .def_property_readonly("nblocks", [](const interp::TableCache& c) { return c.nblocks; });

  const char* op_doc = "Runs the op on its argument object (interpolatron/backends/base.py) and the bucket's "
                       "TableCache (CUDA; None on the CPU); False when a tensor is not dense.";
  m.def("combine", &interp::combine, py::arg("args"), py::arg("cache"), op_doc);
  m.def("gram_row", &interp::gram_row, py::arg("args"), py::arg("cache"), op_doc);
  m.def("rna_record", &interp::rna_record, py::arg("args"), py::arg("cache"), op_doc);
  m.def("rna_extrapolate", &interp::rna_extrapolate, py::arg("args"), py::arg("cache"), op_doc);
  // The scalar attributes each op reads from its argument object (ops.h's field lists).
  py::dict scalars;
  scalars["combine"] = interp::scalar_names<interp::CombineOp>();
  scalars["gram_row"] = interp::scalar_names<interp::GramRowOp>();
  scalars["rna_record"] = interp::scalar_names<interp::RecordOp>();
  scalars["rna_extrapolate"] = interp::scalar_names<interp::ExtrapOp>();
  m.attr("SCALARS") = scalars;

  m.def("has_cuda", [] { return interp::kWithCuda; });
  m.def("cuda_skipped_code", [] { return INTERPOLATRON_CUDA_SKIPPED; });
  m.def("cpu_kernels", &interp::cpu_kernels_name, "The instruction-set variant of the CPU kernels in use.");
  m.def("available_cpu_kernels", &interp::available_cpu_kernels,
        "The CPU kernel variants this build has and this machine can run.");
  m.def("select_cpu_kernels", &interp::select_cpu_kernels, py::arg("name"),
        "Use the CPU kernels for `name` (AVX512, AVX2 or DEFAULT, falling back to what can run); returns the "
        "variant now in use.");
  // Bumped whenever the Python-visible interface changes, so that a stale
  // build is reported as such instead of failing on a missing function.
  m.attr("API_VERSION") = 7;
  m.attr("CPU_CHUNK") = interp::cpu::kChunk;
  m.attr("MAX_SLOTS") = interp::cpu::kMaxSlots;
}
