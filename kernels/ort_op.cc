// onnxruntime custom ops of domain ai.lpvit (version 1), on onnxruntime's Ort::CustomOpBase.
//
// BlockSparseLinear:      Y[..., N] = activation(X[..., K] * W^T + bias) + residual[..., N]
//   inputs X, row_ptr [N/bh + 1], col_idx [nnz], values [nnz, bh, bw] float, bias [N] and residual (Y's shape)
//   optional
// BlockSparseLinearInt8:  the same with W = scales[n] * values, values int8, X quantized per row at run time
//   (bsr_kernel.h states the arithmetic); inputs X, row_ptr, col_idx, values (int8), scales [N] float, bias,
//   residual
// Attributes of both: block_shape = [bh, bw], N, K; activation = "none" (default, also when absent: models
// written before the attribute existed run unchanged) | "relu" | "gelu" (erf form) | "gelu_tanh";
// and, both optional (absent or 0: row-major X [..., K] and Y [..., N]):
//   input_heads = H:  X is head-major [B, H, T, K/H] (an attention's output as its last matmul writes it);
//                     Y [B, T, N], row b*T + t reading X[b, :, t, :] as its K columns
//   output_heads = H: Y is head-major [B, H, T, N/H] (q, k or v as the attention's matmuls read them), from X
//                     [B, T, K] (or head-major); no activation, no residual
// so the Transposes and the Split around an attention need not run (bsr_kernel.h states the conditions).
//
// Weights stored as constant initializers are validated and packed once, when the session creates the kernel,
// and only read afterwards. Weights fed as graph inputs are validated and packed on every call into storage
// local to that call, so concurrent Run()s on one session share no mutable state. Any malformed input
// becomes an error status, never an out-of-bounds access. Inputs are read one by one with null checks (not
// through the lite API's argument tuple, which dereferences an optional input left empty with "" in the middle
// of the input list, e.g. no bias but a residual).
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include "bsr_kernel.h"

namespace {

Ort::Status invalid(const char* op, const std::string& message) {
  return Ort::Status((std::string(op) + ": " + message).c_str(), ORT_INVALID_ARGUMENT);
}

constexpr size_t kX = 0, kRowPtr = 1, kColIdx = 2, kValues = 3;

// One input as the op sees it: data, shape, element count (from a graph input or an initializer).
template <typename T>
struct InputView {
  const T* data = nullptr;
  std::vector<int64_t> shape;
  int64_t size = 0;
};

// The view of `value`, or false when it is absent or not a tensor of T.
template <typename T>
bool view(Ort::ConstValue value, InputView<T>* out) {
  if (value == nullptr || !value.IsTensor()) return false;
  const auto info = value.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != Ort::TypeToTensorType<T>::type) return false;
  *out = {value.GetTensorData<T>(), info.GetShape(), static_cast<int64_t>(info.GetElementCount())};
  return true;
}

struct Attributes {
  int64_t n = 0, k = 0, bh = 0, bw = 0;
  int64_t input_heads = 0, output_heads = 0;
  lpvit::Activation activation = lpvit::Activation::kNone;
  std::string error;  // first attribute that could not be read
};

// The weight inputs of one call or of the constant initializers.
template <typename Value>
struct WeightViews {
  InputView<int64_t> row_ptr, col_idx;
  InputView<Value> values;
  InputView<float> scales, bias;
  bool has_bias = false;
};

// The float op: values float, no scales.
struct FloatFormat {
  using Weights = lpvit::BsrWeights;
  using Value = float;
  static constexpr const char* kName = "BlockSparseLinear";
  static constexpr bool kScaled = false;
  static constexpr size_t kBias = 4, kResidual = 5, kInputs = 6;
  static std::unique_ptr<Weights> create(const Attributes& a, const WeightViews<Value>& w, lpvit::Isa,
                                         std::string* error) {
    return Weights::create(a.n, a.k, a.bh, a.bw, w.row_ptr.data, w.row_ptr.size, w.col_idx.data, w.col_idx.size,
                           w.values.data, w.values.size, w.has_bias ? w.bias.data : nullptr,
                           w.has_bias ? w.bias.size : 0, error);
  }
  static void run(const Weights& w, const float* x, int64_t m, float* y, const lpvit::ParallelFor& pf, lpvit::Isa isa,
                  lpvit::Activation act, const float* residual, const lpvit::HeadLayout& layout) {
    w.run(x, m, y, pf, isa, act, residual, layout);
  }
};

// The int8 op: values int8 and one float scale per output channel.
struct Int8Format {
  using Weights = lpvit::BsrInt8Weights;
  using Value = int8_t;
  static constexpr const char* kName = "BlockSparseLinearInt8";
  static constexpr bool kScaled = true;
  static constexpr size_t kScales = 4, kBias = 5, kResidual = 6, kInputs = 7;
  static std::unique_ptr<Weights> create(const Attributes& a, const WeightViews<Value>& w, lpvit::Isa isa,
                                         std::string* error) {
    return Weights::create(a.n, a.k, a.bh, a.bw, w.row_ptr.data, w.row_ptr.size, w.col_idx.data, w.col_idx.size,
                           w.values.data, w.values.size, w.scales.data, w.scales.size,
                           w.has_bias ? w.bias.data : nullptr, w.has_bias ? w.bias.size : 0, isa, error);
  }
  static void run(const Weights& w, const float* x, int64_t m, float* y, const lpvit::ParallelFor& pf, lpvit::Isa,
                  lpvit::Activation act, const float* residual, const lpvit::HeadLayout& layout) {
    w.run(x, m, y, pf, act, residual, layout);
  }
};

// Checks the buffers' shapes against the attributes, then validates and packs (Format::create) and checks the
// head layouts against the packed weights.
template <class Format>
std::unique_ptr<typename Format::Weights> pack(const Attributes& a, const WeightViews<typename Format::Value>& w,
                                               lpvit::Isa isa, std::string* error) {
  if (w.values.shape.size() != 3 || w.values.shape[1] != a.bh || w.values.shape[2] != a.bw) {
    *error = "values must be [nnz_blocks, " + std::to_string(a.bh) + ", " + std::to_string(a.bw) + "]";
    return nullptr;
  }
  if (w.row_ptr.shape.size() != 1 || w.col_idx.shape.size() != 1 || w.col_idx.shape[0] != w.values.shape[0]) {
    *error = "row_ptr and col_idx must be 1-D, col_idx as long as values' first dimension";
    return nullptr;
  }
  if (w.has_bias && w.bias.shape.size() != 1) {
    *error = "bias must be 1-D";
    return nullptr;
  }
  if (Format::kScaled && w.scales.shape.size() != 1) {
    *error = "scales must be 1-D";
    return nullptr;
  }
  auto weights = Format::create(a, w, isa, error);
  if (weights) *error = weights->check_heads(a.input_heads, a.output_heads, a.activation);
  return error->empty() ? std::move(weights) : nullptr;
}

// X's rows and Y's shape for X of `shape` under the attributes' layouts ("" when X fits them, else the problem).
std::string shapes(const Attributes& a, const std::vector<int64_t>& shape, int64_t* m, lpvit::HeadLayout* layout,
                   std::vector<int64_t>* y_shape) {
  for (int64_t d : shape)
    if (d < 0) return "X has a negative dimension";
  *layout = {0, a.input_heads, a.output_heads};
  if (a.input_heads > 0) {
    if (shape.size() != 4 || shape[1] != a.input_heads || a.k % a.input_heads != 0 || shape[3] != a.k / a.input_heads)
      return "with input_heads=" + std::to_string(a.input_heads) + ", X must be [B, " + std::to_string(a.input_heads) +
             ", T, " + std::to_string(a.k / a.input_heads) + "] (head-major, K=" + std::to_string(a.k) + ")";
    layout->tokens = shape[2];
    *y_shape = {shape[0], shape[2], a.n};
  } else {
    if (shape.empty() || shape.back() != a.k) return "X's last dimension must be K=" + std::to_string(a.k);
    if (a.output_heads > 0 && shape.size() != 3) return "with output_heads, X must be [B, T, K] or head-major";
    if (a.output_heads > 0) layout->tokens = shape[1];
    *y_shape = shape;
    y_shape->back() = a.n;
  }
  *m = 1;
  for (size_t i = 0; i + 1 < y_shape->size(); ++i) *m *= (*y_shape)[i];
  if (a.output_heads > 0) *y_shape = {(*y_shape)[0], a.output_heads, layout->tokens, a.n / a.output_heads};
  return "";
}

template <typename T>
bool constant_input(const OrtApi* api, const OrtKernelInfo* info, size_t index, InputView<T>* out) {
  int is_constant = 0;
  const OrtValue* value = nullptr;
  if (OrtStatus* status = api->KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value)) {
    api->ReleaseStatus(status);
    return false;
  }
  return is_constant && view(Ort::ConstValue{value}, out);
}

// Whether the node lists input `index` with a name (an absent optional input is left out or named "").
bool named_input(const OrtApi* api, const OrtKernelInfo* info, size_t index) {
  size_t inputs = 0, name_len = 0;
  if (OrtStatus* status = api->KernelInfo_GetInputCount(info, &inputs)) {
    api->ReleaseStatus(status);
    return false;
  }
  if (index >= inputs) return false;
  if (OrtStatus* status = api->KernelInfo_GetInputName(info, index, nullptr, &name_len)) {
    api->ReleaseStatus(status);
    return false;
  }
  return name_len > 1;  // the length counts the terminating NUL
}

struct ParallelJob {
  const std::function<void(size_t)>* body;
};

void run_one(void* data, size_t task) { (*static_cast<ParallelJob*>(data)->body)(task); }

template <class Format>
struct LinearKernel {
  LinearKernel(const OrtApi* api, const OrtKernelInfo* info) {
    auto read = [&](OrtStatus* status) {
      if (status != nullptr && attributes_.error.empty()) attributes_.error = api->GetErrorMessage(status);
      if (status != nullptr) api->ReleaseStatus(status);
      return status == nullptr;
    };
    read(api->KernelInfoGetAttribute_int64(info, "N", &attributes_.n));
    read(api->KernelInfoGetAttribute_int64(info, "K", &attributes_.k));
    size_t count = 0;
    if (read(api->KernelInfoGetAttributeArray_int64(info, "block_shape", nullptr, &count))) {
      if (count != 2) {
        attributes_.error = "block_shape must have 2 entries, got " + std::to_string(count);
      } else {
        int64_t shape[2] = {0, 0};
        read(api->KernelInfoGetAttributeArray_int64(info, "block_shape", shape, &count));
        attributes_.bh = shape[0], attributes_.bw = shape[1];
      }
    }
    if (attributes_.error.empty()) read_activation(api, info);
    for (auto [name, value] : {std::pair{"input_heads", &attributes_.input_heads},
                               std::pair{"output_heads", &attributes_.output_heads}}) {
      if (OrtStatus* status = api->KernelInfoGetAttribute_int64(info, name, value)) {  // absent: 0
        api->ReleaseStatus(status);
        *value = 0;
      }
    }
    if (attributes_.error.empty()) pack_constant_weights(api, info);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const { return compute(context).release(); }

 private:
  using Weights = typename Format::Weights;

  Ort::Status compute(OrtKernelContext* context) const {  // reads no mutable member
    try {
      if (!attributes_.error.empty()) return invalid(Format::kName, "bad attribute: " + attributes_.error);
      Ort::KernelContext ctx(context);
      const size_t inputs = ctx.GetInputCount();
      auto input = [&](size_t index) { return index < inputs ? ctx.GetInput(index) : Ort::ConstValue{nullptr}; };
      InputView<float> x;
      if (!view(input(kX), &x)) return invalid(Format::kName, "X must be a float tensor");
      int64_t m = 0;
      lpvit::HeadLayout layout;
      std::vector<int64_t> y_shape;
      const std::string shape_error = shapes(attributes_, x.shape, &m, &layout, &y_shape);
      if (!shape_error.empty()) return invalid(Format::kName, shape_error);

      const Weights* weights = constant_weights_.get();
      std::unique_ptr<Weights> call_weights;  // weights fed as inputs: this call's own copy
      if (weights == nullptr) {
        if (!constant_error_.empty()) return invalid(Format::kName, constant_error_);
        WeightViews<typename Format::Value> w;
        std::string error = read_weights([&](size_t index) { return input(index); }, &w);
        if (error.empty()) call_weights = pack<Format>(attributes_, w, isa_, &error);
        if (!call_weights) return invalid(Format::kName, error);
        weights = call_weights.get();
      }

      InputView<float> residual;
      if (input(Format::kResidual) != nullptr) {
        if (layout.y_heads > 0) return invalid(Format::kName, "output_heads takes no residual");
        if (!view(input(Format::kResidual), &residual) || residual.shape != y_shape)
          return invalid(Format::kName, "residual must be a float tensor of Y's shape (X's with K replaced by N)");
      }
      float* out = ctx.GetOutput(0, y_shape).GetTensorMutableData<float>();
      const OrtApi& api = Ort::GetApi();
      Format::run(*weights, x.data, m, out,
                  [&](size_t tasks, const std::function<void(size_t)>& body) {
                    ParallelJob job{&body};
                    OrtStatus* status = api.KernelContext_ParallelFor(context, run_one, tasks, 0, &job);
                    if (status != nullptr) {  // no thread pool: run inline
                      api.ReleaseStatus(status);
                      for (size_t t = 0; t < tasks; ++t) body(t);
                    }
                  },
                  isa_, attributes_.activation, residual.data, layout);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {  // bad_alloc, Ort::Exception: an error status, never terminate
      return Ort::Status((std::string(Format::kName) + ": " + e.what()).c_str(), ORT_FAIL);
    }
  }

  // Views of the weight inputs fed to a call ("" when all have the right types, else the problem).
  template <class Input>
  static std::string read_weights(Input input, WeightViews<typename Format::Value>* w) {
    if (!view(input(kRowPtr), &w->row_ptr) || !view(input(kColIdx), &w->col_idx) || !view(input(kValues), &w->values))
      return std::string("row_ptr, col_idx (int64) and values (") + (Format::kScaled ? "int8" : "float") +
             ") are required";
    if constexpr (Format::kScaled) {
      if (!view(input(Format::kScales), &w->scales)) return "scales (float) are required";
    }
    w->has_bias = input(Format::kBias) != nullptr;
    if (w->has_bias && !view(input(Format::kBias), &w->bias)) return "bias must be a float tensor";
    return "";
  }

  // Optional string attribute "activation"; absent means "none".
  void read_activation(const OrtApi* api, const OrtKernelInfo* info) {
    size_t length = 0;
    if (OrtStatus* status = api->KernelInfoGetAttribute_string(info, "activation", nullptr, &length)) {
      const std::string message = api->GetErrorMessage(status);
      api->ReleaseStatus(status);
      if (message.find("No attribute") == std::string::npos) attributes_.error = "activation: " + message;
      return;
    }
    std::string name(length, '\0');
    if (OrtStatus* status = api->KernelInfoGetAttribute_string(info, "activation", name.data(), &length)) {
      attributes_.error = std::string("activation: ") + api->GetErrorMessage(status);
      api->ReleaseStatus(status);
      return;
    }
    name.resize(length > 0 ? length - 1 : 0);  // the reported length counts the terminating NUL
    if (!lpvit::parse_activation(name, &attributes_.activation))
      attributes_.error = "activation is '" + name + "', expected one of " + lpvit::activation_names();
  }

  // When every weight input is a constant initializer, validate and pack it now, once; a malformed one is
  // remembered and reported by every Compute (so the error reads the same as for weights fed as inputs).
  void pack_constant_weights(const OrtApi* api, const OrtKernelInfo* info) {
    try {
      WeightViews<typename Format::Value> w;
      bool constant = constant_input(api, info, kRowPtr, &w.row_ptr) &&
                      constant_input(api, info, kColIdx, &w.col_idx) && constant_input(api, info, kValues, &w.values);
      if constexpr (Format::kScaled) constant = constant && constant_input(api, info, Format::kScales, &w.scales);
      if (!constant) return;
      w.has_bias = named_input(api, info, Format::kBias);
      if (w.has_bias && !constant_input(api, info, Format::kBias, &w.bias)) return;
      std::string error;
      constant_weights_ = pack<Format>(attributes_, w, isa_, &error);
      if (!constant_weights_) constant_error_ = error;
    } catch (const std::exception& e) {
      constant_weights_.reset();
      constant_error_ = e.what();
    }
  }

  Attributes attributes_;
  lpvit::Isa isa_ = lpvit::best_isa();
  std::unique_ptr<const Weights> constant_weights_;  // set once at creation, then only read
  std::string constant_error_;
};

template <class Format>
struct LinearOp : Ort::CustomOpBase<LinearOp<Format>, LinearKernel<Format>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new LinearKernel<Format>(&api, info);
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, (std::string(Format::kName) + ": " + e.what()).c_str());
    }
  }
  const char* GetName() const { return Format::kName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return Format::kInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    if (index == kRowPtr || index == kColIdx) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    if (index == kValues) return Ort::TypeToTensorType<typename Format::Value>::type;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= Format::kBias ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                                  : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) {
    try {
      using Dim = Ort::ShapeInferContext::SymbolicInteger;
      auto optional_int = [&](const char* name) -> int64_t {  // absent: 0
        try {
          return ctx.GetAttrInt(name);
        } catch (const Ort::Exception&) {
          return 0;
        }
      };
      Ort::ShapeInferContext::Shape shape = ctx.GetInputShape(0);
      if (shape.empty()) return invalid(Format::kName, "X must have at least one dimension");
      const int64_t n = ctx.GetAttrInt("N"), input_heads = optional_int("input_heads");
      const int64_t output_heads = optional_int("output_heads");
      if (input_heads > 0 && shape.size() == 4) shape.erase(shape.begin() + 1);  // [B, H, T, D] -> [B, T, D]
      if (output_heads > 0 && shape.size() == 3 && n % output_heads == 0) {  // [B, T, K] -> [B, H, T, N / H]
        shape.back() = Dim(n / output_heads);
        shape.insert(shape.begin() + 1, Dim(output_heads));
        return ctx.SetOutputShape(0, shape);
      }
      shape.back() = Dim(n);
      return ctx.SetOutputShape(0, shape);
    } catch (const std::exception& e) {
      return invalid(Format::kName, e.what());
    }
  }
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "the lpvit kernel library needs onnxruntime >= 1.21");
  // The ops and one domain for the whole process, shared by every session that registers the library: the
  // domain must outlive those sessions, and registering again must not allocate another.
  static OrtStatus* init_error = nullptr;
  static OrtCustomOpDomain* domain = nullptr;
  static std::once_flag once;
  std::call_once(once, [&] {
    Ort::InitApi(api);
    static const LinearOp<FloatFormat> float_op;
    static const LinearOp<Int8Format> int8_op;
    if ((init_error = api->CreateCustomOpDomain("ai.lpvit", &domain)) != nullptr) return;
    if ((init_error = api->CustomOpDomain_Add(domain, &float_op)) != nullptr) return;
    init_error = api->CustomOpDomain_Add(domain, &int8_op);
  });
  if (init_error != nullptr) return api->CreateStatus(ORT_FAIL, api->GetErrorMessage(init_error));
  return api->AddCustomOpDomain(options, domain);
}
