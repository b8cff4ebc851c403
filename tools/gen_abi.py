"""Generate netkernel/_abi.py from include/netkernel/abi.h at build time.

Every integer #define NK_* in the header becomes a Python constant, so the wire constants the
control plane uses cannot drift from the C ones (DESIGN §G). Usage: gen_abi.py ABI_H OUT_PY
"""

import re
import sys

DEFINE = re.compile(r"^#define\s+(NK_[A-Z0-9_]+)\s+(.+?)\s*(?:/\*.*)?$")


def main(header: str, out: str) -> None:
    consts: dict[str, int] = {}
    for line in open(header, encoding="utf-8"):
        m = DEFINE.match(line.strip())
        if not m:
            continue
        expr = m.group(2)
        expr = re.sub(r"(\d+)u\b", r"\1", expr)  # C unsigned suffix
        expr = re.sub(r"'(.)'", lambda c: str(ord(c.group(1))), expr)
        try:
            consts[m.group(1)] = int(eval(expr, {"__builtins__": {}}, dict(consts)))
        except Exception:
            continue  # function-like or non-integer macros
    with open(out, "w", encoding="utf-8") as f:
        f.write('"""Generated from include/netkernel/abi.h by tools/gen_abi.py. Do not edit."""\n\n')
        for name, value in consts.items():
            f.write(f"{name} = {value}\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
