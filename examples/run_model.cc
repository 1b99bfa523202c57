// Run an lpvit-compiled ONNX model from C++ with onnxruntime, the lpvit op library linked in.
//
//   LIB=$(python -c "import lpvit_compiler as l, os; print(os.path.dirname(l.kernels_library_path()))")
//   g++ -std=c++17 run_model.cc -I/usr/include/onnxruntime -L"$LIB" -llpvit_kernels -lonnxruntime \
//       -Wl,-rpath,"$LIB" -o run_model
//   ./run_model model.onnx
//
// Linking liblpvit_kernels.so makes its RegisterCustomOps entry point visible to onnxruntime, which
// RegisterCustomOpsUsingFunction calls; SessionOptions::RegisterCustomOpsLibrary("path/liblpvit_kernels.so")
// loads it at run time instead.
#include <onnxruntime_cxx_api.h>

#include <array>
#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s model.onnx\n", argv[0]);
    return 2;
  }
  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "lpvit");
  Ort::SessionOptions options;
  options.SetIntraOpNumThreads(2);
  options.RegisterCustomOpsUsingFunction("RegisterCustomOps");
  Ort::Session session(env, argv[1], options);

  std::array<int64_t, 4> shape{1, 3, 224, 224};  // [batch, C, H, W] as exported
  std::vector<float> pixels(1 * 3 * 224 * 224, 0.5f);
  auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::Value input = Ort::Value::CreateTensor<float>(memory, pixels.data(), pixels.size(), shape.data(),
                                                     shape.size());
  const char* input_names[] = {"pixel_values"};
  const char* output_names[] = {"logits"};
  auto outputs = session.Run(Ort::RunOptions{nullptr}, input_names, &input, 1, output_names, 1);
  const float* logits = outputs[0].GetTensorData<float>();
  size_t classes = outputs[0].GetTensorTypeAndShapeInfo().GetShape()[1];
  size_t best = 0;
  for (size_t i = 1; i < classes; ++i) best = logits[i] > logits[best] ? i : best;
  std::printf("predicted class %zu (logit %.4f)\n", best, logits[best]);
  return 0;
}
