"""Small ONNX text graphs with one weight ``w`` (3 x 1), shared by the CLI tests."""

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
# Nonlinear in w, so that the two runs normalise differently and epsilon is non-zero.
SQUARE = """
square (float[N,3] x) => (float[N,1] y) {
  h = MatMul (x, w)
  s = Mul (h, h)
  y = Add (h, s)
}
"""
# The output is h - h = 0 for every sample, so epsilon is undefined.
CONSTANT = """
constant (float[N,3] x) => (float[N,1] y) {
  h = MatMul (x, w)
  y = Sub (h, h)
}
"""
