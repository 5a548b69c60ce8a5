"""``python -m lrq_ao.quality``: round-to-nearest floors of every format on the real MiniLM-L6 weights."""

from lrq_ao.quality.baseline import format_floors, measure_rtn_floors
from lrq_ao.quality.minilm import load_minilm

if __name__ == "__main__":
    print("Round-to-nearest on all-MiniLM-L6-v2: weight SQNR over the 36 encoder linears, end-to-end SQNR of the")
    print("final hidden state on the evaluation split (real tokens only).")
    print(format_floors(measure_rtn_floors(load_minilm())))
