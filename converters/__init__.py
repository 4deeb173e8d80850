"""Converters from NAS-benchmark architecture encodings and framework models to ONNX.

Modules: ``nb201`` (NAS-Bench-201 arch strings), ``nb101`` (NAS-Bench-101 adjacency
matrix and op list), ``nlp`` (NAS-Bench-NLP recurrent-cell recipes) and ``cli`` (the
``convert`` click command group). Each encoding converter has ``build``, which returns
an ``onnx.ModelProto``, and ``convert``, which writes the model to a file.

``torch_export`` (PyTorch modules, the ``onnxeps[torch]`` extra) and ``keras_export``
(Keras models and SavedModels, the ``onnxeps[tensorflow]`` extra) export live models
with normalisation kept as normalisation operators. They import their framework only
when they run.
"""
