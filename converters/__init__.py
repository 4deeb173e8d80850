"""Converters from NAS-benchmark architecture encodings to ONNX models.

Modules: ``nb201`` (NAS-Bench-201 arch strings), ``nb101`` (NAS-Bench-101 adjacency
matrix and op list), ``nlp`` (NAS-Bench-NLP recurrent-cell recipes) and ``cli`` (the
``convert`` click command group). Each converter module has ``build``, which returns
an ``onnx.ModelProto``, and ``convert``, which writes the model to a file.
"""
