// onnxruntime custom op ai.lpvit::BlockSparseLinear (version 1), on onnxruntime's Ort::CustomOpBase.
//
//   Y[..., N] = activation(X[..., K] * W^T + bias) + residual[..., N]
//   W in BSR: row_ptr [N/bh + 1], col_idx [nnz], values [nnz, bh, bw]; bias [N] and residual (Y's shape) optional
//   attributes: block_shape = [bh, bw], N, K; activation = "none" (default, also when absent: models written
//   before the attribute existed run unchanged) | "relu" | "gelu" (erf form) | "gelu_tanh"
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

Ort::Status invalid(const std::string& message) {
  return Ort::Status(("BlockSparseLinear: " + message).c_str(), ORT_INVALID_ARGUMENT);
}

enum Input : size_t { kX, kRowPtr, kColIdx, kValues, kBias, kResidual, kInputs };

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
  lpvit::Activation activation = lpvit::Activation::kNone;
  std::string error;  // first attribute that could not be read
};

// Checks the buffers' shapes against the attributes, then validates and packs (BsrWeights::create).
std::unique_ptr<lpvit::BsrWeights> pack(const Attributes& a, const InputView<int64_t>& row_ptr,
                                        const InputView<int64_t>& col_idx, const InputView<float>& values,
                                        const InputView<float>* bias, std::string* error) {
  if (values.shape.size() != 3 || values.shape[1] != a.bh || values.shape[2] != a.bw) {
    *error = "values must be [nnz_blocks, " + std::to_string(a.bh) + ", " + std::to_string(a.bw) + "]";
    return nullptr;
  }
  if (row_ptr.shape.size() != 1 || col_idx.shape.size() != 1 || col_idx.shape[0] != values.shape[0]) {
    *error = "row_ptr and col_idx must be 1-D, col_idx as long as values' first dimension";
    return nullptr;
  }
  if (bias != nullptr && bias->shape.size() != 1) {
    *error = "bias must be 1-D";
    return nullptr;
  }
  return lpvit::BsrWeights::create(a.n, a.k, a.bh, a.bw, row_ptr.data, row_ptr.size, col_idx.data, col_idx.size,
                                   values.data, values.size, bias ? bias->data : nullptr, bias ? bias->size : 0,
                                   error);
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

struct BlockSparseLinearKernel {
  BlockSparseLinearKernel(const OrtApi* api, const OrtKernelInfo* info) {
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
    if (attributes_.error.empty()) pack_constant_weights(api, info);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const { return compute(context).release(); }

 private:
  Ort::Status compute(OrtKernelContext* context) const {  // reads no mutable member
    try {
      if (!attributes_.error.empty()) return invalid("bad attribute: " + attributes_.error);
      Ort::KernelContext ctx(context);
      const size_t inputs = ctx.GetInputCount();
      auto input = [&](size_t index) { return index < inputs ? ctx.GetInput(index) : Ort::ConstValue{nullptr}; };
      InputView<float> x;
      if (!view(input(kX), &x)) return invalid("X must be a float tensor");
      if (x.shape.empty() || x.shape.back() != attributes_.k)
        return invalid("X's last dimension must be K=" + std::to_string(attributes_.k));
      int64_t m = 1;
      for (size_t i = 0; i + 1 < x.shape.size(); ++i) {
        if (x.shape[i] < 0) return invalid("X has a negative dimension");
        m *= x.shape[i];
      }

      const lpvit::BsrWeights* weights = constant_weights_.get();
      std::unique_ptr<lpvit::BsrWeights> call_weights;  // weights fed as inputs: this call's own copy
      if (weights == nullptr) {
        if (!constant_error_.empty()) return invalid(constant_error_);
        InputView<int64_t> row_ptr, col_idx;
        InputView<float> values, bias;
        if (!view(input(kRowPtr), &row_ptr) || !view(input(kColIdx), &col_idx) || !view(input(kValues), &values))
          return invalid("row_ptr, col_idx (int64) and values (float) are required");
        const bool has_bias = input(kBias) != nullptr;
        if (has_bias && !view(input(kBias), &bias)) return invalid("bias must be a float tensor");
        std::string error;
        call_weights = pack(attributes_, row_ptr, col_idx, values, has_bias ? &bias : nullptr, &error);
        if (!call_weights) return invalid(error);
        weights = call_weights.get();
      }

      std::vector<int64_t> y_shape = x.shape;
      y_shape.back() = attributes_.n;
      InputView<float> residual;
      if (input(kResidual) != nullptr) {
        if (!view(input(kResidual), &residual) || residual.shape != y_shape)
          return invalid("residual must be a float tensor of Y's shape (X's with K replaced by N)");
      }
      float* out = ctx.GetOutput(0, y_shape).GetTensorMutableData<float>();
      const OrtApi& api = Ort::GetApi();
      weights->run(x.data, m, out,
                   [&](size_t tasks, const std::function<void(size_t)>& body) {
                     ParallelJob job{&body};
                     OrtStatus* status = api.KernelContext_ParallelFor(context, run_one, tasks, 0, &job);
                     if (status != nullptr) {  // no thread pool: run inline
                       api.ReleaseStatus(status);
                       for (size_t t = 0; t < tasks; ++t) body(t);
                     }
                   },
                   isa_, attributes_.activation, residual.data);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {  // bad_alloc, Ort::Exception: an error status, never terminate
      return Ort::Status(("BlockSparseLinear: " + std::string(e.what())).c_str(), ORT_FAIL);
    }
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
      InputView<int64_t> row_ptr, col_idx;
      InputView<float> values, bias;
      if (!constant_input(api, info, kRowPtr, &row_ptr) || !constant_input(api, info, kColIdx, &col_idx) ||
          !constant_input(api, info, kValues, &values))
        return;
      const bool has_bias = named_input(api, info, kBias);
      if (has_bias && !constant_input(api, info, kBias, &bias)) return;
      std::string error;
      constant_weights_ = pack(attributes_, row_ptr, col_idx, values, has_bias ? &bias : nullptr, &error);
      if (!constant_weights_) constant_error_ = error;
    } catch (const std::exception& e) {
      constant_weights_.reset();
      constant_error_ = e.what();
    }
  }

  Attributes attributes_;
  lpvit::Isa isa_ = lpvit::best_isa();
  std::unique_ptr<const lpvit::BsrWeights> constant_weights_;  // set once at creation, then only read
  std::string constant_error_;
};

struct BlockSparseLinearOp : Ort::CustomOpBase<BlockSparseLinearOp, BlockSparseLinearKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new BlockSparseLinearKernel(&api, info);
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, (std::string("BlockSparseLinear: ") + e.what()).c_str());
    }
  }
  const char* GetName() const { return "BlockSparseLinear"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == kRowPtr || index == kColIdx ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                                                : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= kBias ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                          : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) {
    try {
      Ort::ShapeInferContext::Shape shape = ctx.GetInputShape(0);
      if (shape.empty()) return invalid("X must have at least one dimension");
      shape.back() = Ort::ShapeInferContext::SymbolicInteger(ctx.GetAttrInt("N"));
      return ctx.SetOutputShape(0, shape);
    } catch (const std::exception& e) {
      return invalid(e.what());
    }
  }
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "the lpvit kernel library needs onnxruntime >= 1.21");
  // One op and one domain for the whole process, shared by every session that registers the library: the
  // domain must outlive those sessions, and registering again must not allocate another.
  static OrtStatus* init_error = nullptr;
  static OrtCustomOpDomain* domain = nullptr;
  static std::once_flag once;
  std::call_once(once, [&] {
    Ort::InitApi(api);
    static const BlockSparseLinearOp op;
    if ((init_error = api->CreateCustomOpDomain("ai.lpvit", &domain)) != nullptr) return;
    init_error = api->CustomOpDomain_Add(domain, &op);
  });
  if (init_error != nullptr) return api->CreateStatus(ORT_FAIL, api->GetErrorMessage(init_error));
  return api->AddCustomOpDomain(options, domain);
}
