"""Inference runtimes besides eager torch: ONNX Runtime (:mod:`.onnx`) and CPU allocator tuning (:mod:`.memory`)."""
