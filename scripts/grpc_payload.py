"""Writes a gRPC-framed ModelInferRequest (raw_input_contents) for h2load's --data."""
import struct, sys
def varint(n):
    out = b""
    while True:
        b = n & 0x7F; n >>= 7
        if n: out += bytes([b | 0x80])
        else: return out + bytes([b])
def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 2: return key + varint(len(payload)) + payload
    return key + payload
model, inp, dtype, shape, out = sys.argv[1], sys.argv[2], sys.argv[3], [int(x) for x in sys.argv[4].split(",")], sys.argv[5]
n = 1
for d in shape: n *= d
size = {"FP32": 4, "INT64": 8}[dtype]
shape_packed = b"".join(varint(d) for d in shape)
tensor = field(1, 2, inp.encode()) + field(2, 2, dtype.encode()) + field(3, 2, shape_packed)
raw = struct.pack("<%df" % n, *[0.1 * (i % 7) for i in range(n)]) if dtype == "FP32" else b"\0" * (n * size)
msg = field(1, 2, model.encode()) + field(5, 2, tensor) + field(7, 2, raw)
open(out, "wb").write(b"\0" + struct.pack(">I", len(msg)) + msg)
