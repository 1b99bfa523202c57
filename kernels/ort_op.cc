// onnxruntime custom op ai.lpvit::BlockSparseLinear (version 1), built on the lite custom-op API.
//
//   Y[..., N] = X[..., K] * W^T + bias,  W in BSR: row_ptr [N/bh + 1], col_idx [nnz], values [nnz, bh, bw]
//   attributes: block_shape = [bh, bw], N, K
//
// The weights are validated and repacked once, on the first run, and again only if their buffers change;
// any malformed input becomes an error status, never an out-of-bounds access.
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

struct ParallelJob {
  const std::function<void(size_t)>* body;
};

void run_one(void* data, size_t task) { (*static_cast<ParallelJob*>(data)->body)(task); }

struct BlockSparseLinearKernel {
  BlockSparseLinearKernel(const OrtApi* api, const OrtKernelInfo* info) {
    auto read = [&](OrtStatus* status) {
      if (status != nullptr && attribute_error_.empty()) attribute_error_ = api->GetErrorMessage(status);
      if (status != nullptr) api->ReleaseStatus(status);
      return status == nullptr;
    };
    read(api->KernelInfoGetAttribute_int64(info, "N", &n_));
    read(api->KernelInfoGetAttribute_int64(info, "K", &k_));
    size_t count = 0;
    if (read(api->KernelInfoGetAttributeArray_int64(info, "block_shape", nullptr, &count))) {
      if (count != 2) {
        attribute_error_ = "block_shape must have 2 entries, got " + std::to_string(count);
      } else {
        int64_t shape[2] = {0, 0};
        read(api->KernelInfoGetAttributeArray_int64(info, "block_shape", shape, &count));
        bh_ = shape[0], bw_ = shape[1];
      }
    }
  }

  Ort::Status Compute(OrtKernelContext* context, const Tensor<float>& x, const Tensor<int64_t>& row_ptr,
                      const Tensor<int64_t>& col_idx, const Tensor<float>& values,
                      std::optional<const Tensor<float>*> bias, Tensor<float>& y) {
    if (!attribute_error_.empty()) return invalid("bad attribute: " + attribute_error_);
    const std::vector<int64_t> x_shape = x.Shape();
    if (x_shape.empty() || x_shape.back() != k_)
      return invalid("X's last dimension must be K=" + std::to_string(k_));
    const std::vector<int64_t> v_shape = values.Shape();
    if (v_shape.size() != 3 || v_shape[1] != bh_ || v_shape[2] != bw_)
      return invalid("values must be [nnz_blocks, " + std::to_string(bh_) + ", " + std::to_string(bw_) + "]");
    if (row_ptr.Shape().size() != 1 || col_idx.Shape().size() != 1 || col_idx.Shape()[0] != v_shape[0])
      return invalid("row_ptr and col_idx must be 1-D, col_idx as long as values' first dimension");
    const Tensor<float>* bias_tensor = bias.has_value() ? *bias : nullptr;
    if (bias_tensor != nullptr && bias_tensor->Shape().size() != 1) return invalid("bias must be 1-D");

    const lpvit::BsrWeights* weights = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const std::vector<const void*> key = {row_ptr.Data(), col_idx.Data(), values.Data(),
                                            bias_tensor ? bias_tensor->Data() : nullptr};
      if (!weights_ || key != weights_key_) {
        std::string error;
        weights_ = lpvit::BsrWeights::create(
            n_, k_, bh_, bw_, row_ptr.Data(), row_ptr.NumberOfElement(), col_idx.Data(), col_idx.NumberOfElement(),
            values.Data(), values.NumberOfElement(), bias_tensor ? bias_tensor->Data() : nullptr,
            bias_tensor ? bias_tensor->NumberOfElement() : 0, &error);
        if (!weights_) return invalid(error);
        weights_key_ = key;
      }
      weights = weights_.get();
    }
    int64_t m = 1;
    for (size_t i = 0; i + 1 < x_shape.size(); ++i) {
      if (x_shape[i] < 0) return invalid("X has a negative dimension");
      m *= x_shape[i];
    }
    std::vector<int64_t> y_shape = x_shape;
    y_shape.back() = n_;
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
  int64_t n_ = 0, k_ = 0, bh_ = 0, bw_ = 0;
  std::string attribute_error_;
  lpvit::Isa isa_ = lpvit::best_isa();
  std::mutex mutex_;
  std::unique_ptr<lpvit::BsrWeights> weights_;
  std::vector<const void*> weights_key_;
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "the lpvit kernel library needs onnxruntime >= 1.21");
  Ort::InitApi(api);
  static const std::unique_ptr<Ort::Custom::OrtLiteCustomOp> op{
      Ort::Custom::CreateLiteCustomOp<BlockSparseLinearKernel>("BlockSparseLinear", "CPUExecutionProvider")};
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = api->CreateCustomOpDomain("ai.lpvit", &domain)) return status;
  if (OrtStatus* status = api->CustomOpDomain_Add(domain, op.get())) return status;
  // The domain must outlive every session using it; a process-lifetime leak of one small object is intended.
  return api->AddCustomOpDomain(options, domain);
}
