"""Tools around the compiler: side-by-side timing, accuracy, datasets, distillation fine-tuning."""
