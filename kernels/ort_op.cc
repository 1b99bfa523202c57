// onnxruntime custom op ai.lpvit::BlockSparseLinear (version 1), built on the lite custom-op API.
//
//   Y[..., N] = X[..., K] * W^T + bias,  W in BSR: row_ptr [N/bh + 1], col_idx [nnz], values [nnz, bh, bw]
//   attributes: block_shape = [bh, bw], N, K
//
// Weights stored as constant initializers are validated and packed once, when the session creates the kernel,
// and only read afterwards. Weights fed as graph inputs are validated and packed on every call into storage
// local to that call, so concurrent Run()s on one session share no mutable state. Any malformed input
// becomes an error status, never an out-of-bounds access.
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#include "onnxruntime_lite_custom_op.h"
#undef ORT_API_MANUAL_INIT

#include "bsr_kernel.h"

namespace {

using Ort::Custom::Tensor;

Ort::Status invalid(const std::string& message) {
  return Ort::Status(("BlockSparseLinear: " + message).c_str(), ORT_INVALID_ARGUMENT);
}

// One weight input as the op sees it: data, shape, element count (from a graph input or an initializer).
template <typename T>
struct InputView {
  const T* data = nullptr;
  std::vector<int64_t> shape;
  int64_t size = 0;
};

template <typename T>
InputView<T> view(const Tensor<T>& tensor) {
  return {tensor.Data(), tensor.Shape(), tensor.NumberOfElement()};
}

struct Attributes {
  int64_t n = 0, k = 0, bh = 0, bw = 0;
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
  if (!is_constant || value == nullptr) return false;
  Ort::ConstValue tensor{value};
  const auto type_and_shape = tensor.GetTensorTypeAndShapeInfo();
  if (type_and_shape.GetElementType() != Ort::TypeToTensorType<T>::type) return false;
  *out = {tensor.GetTensorData<T>(), type_and_shape.GetShape(),
          static_cast<int64_t>(type_and_shape.GetElementCount())};
  return true;
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
    if (attributes_.error.empty()) pack_constant_weights(api, info);
  }

  Ort::Status Compute(OrtKernelContext* context, const Tensor<float>& x, const Tensor<int64_t>& row_ptr,
                      const Tensor<int64_t>& col_idx, const Tensor<float>& values,
                      std::optional<const Tensor<float>*> bias, Tensor<float>& y) {  // reads no mutable member
    try {
      if (!attributes_.error.empty()) return invalid("bad attribute: " + attributes_.error);
      const std::vector<int64_t> x_shape = x.Shape();
      if (x_shape.empty() || x_shape.back() != attributes_.k)
        return invalid("X's last dimension must be K=" + std::to_string(attributes_.k));
      int64_t m = 1;
      for (size_t i = 0; i + 1 < x_shape.size(); ++i) {
        if (x_shape[i] < 0) return invalid("X has a negative dimension");
        m *= x_shape[i];
      }

      const lpvit::BsrWeights* weights = constant_weights_.get();
      std::unique_ptr<lpvit::BsrWeights> call_weights;  // weights fed as inputs: this call's own copy
      if (weights == nullptr) {
        if (!constant_error_.empty()) return invalid(constant_error_);
        std::string error;
        const InputView<float> bias_view = bias.has_value() && *bias ? view(**bias) : InputView<float>{};
        call_weights = pack(attributes_, view(row_ptr), view(col_idx), view(values),
                            bias.has_value() && *bias ? &bias_view : nullptr, &error);
        if (!call_weights) return invalid(error);
        weights = call_weights.get();
      }

      std::vector<int64_t> y_shape = x_shape;
      y_shape.back() = attributes_.n;
      float* out = y.Allocate(y_shape);
      const OrtApi& api = Ort::GetApi();
      weights->run(x.Data(), m, out,
                   [&](size_t tasks, const std::function<void(size_t)>& body) {
                     ParallelJob job{&body};
                     OrtStatus* status = api.KernelContext_ParallelFor(context, run_one, tasks, 0, &job);
                     if (status != nullptr) {  // no thread pool: run inline
                       api.ReleaseStatus(status);
                       for (size_t t = 0; t < tasks; ++t) body(t);
                     }
                   },
                   isa_);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {  // bad_alloc, Ort::Exception: an error status, never terminate
      return Ort::Status(("BlockSparseLinear: " + std::string(e.what())).c_str(), ORT_FAIL);
    }
  }

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

 private:
  // When every weight input is a constant initializer, validate and pack it now, once; a malformed one is
  // remembered and reported by every Compute (kernel creation has no way to return an error here).
  void pack_constant_weights(const OrtApi* api, const OrtKernelInfo* info) {
    try {
      size_t inputs = 0;
      if (OrtStatus* status = api->KernelInfo_GetInputCount(info, &inputs)) {
        api->ReleaseStatus(status);
        return;
      }
      InputView<int64_t> row_ptr, col_idx;
      InputView<float> values, bias;
      if (!constant_input(api, info, 1, &row_ptr) || !constant_input(api, info, 2, &col_idx) ||
          !constant_input(api, info, 3, &values))
        return;
      bool has_bias = false;
      if (inputs > 4) {
        size_t name_len = 0;  // an absent optional input has an empty name
        if (OrtStatus* status = api->KernelInfo_GetInputName(info, 4, nullptr, &name_len)) {
          api->ReleaseStatus(status);
          return;
        }
        has_bias = name_len > 1;
        if (has_bias && !constant_input(api, info, 4, &bias)) return;
      }
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
    static const std::unique_ptr<Ort::Custom::OrtLiteCustomOp> op{
        Ort::Custom::CreateLiteCustomOp<BlockSparseLinearKernel>("BlockSparseLinear", "CPUExecutionProvider")};
    if ((init_error = api->CreateCustomOpDomain("ai.lpvit", &domain)) != nullptr) return;
    init_error = api->CustomOpDomain_Add(domain, op.get());
  });
  if (init_error != nullptr) return api->CreateStatus(ORT_FAIL, api->GetErrorMessage(init_error));
  return api->AddCustomOpDomain(options, domain);
}
