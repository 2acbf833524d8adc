"""Run a benchmark script after executing a setup statement (an A/B switch without editing the library):

    python benchmarks/gpu/run_patched.py "import numba_kernels.cuda.decode_attention as m; m.TC_TILES['gpu'] = (4, 3, 16, False, False, True)" \
        benchmarks/gpu/check_decode_attention.py check --quick
"""
import runpy
import sys

if __name__ == "__main__":
    stmt, script = sys.argv[1], sys.argv[2]
    exec(stmt, {})
    sys.argv = [script] + sys.argv[3:]
    runpy.run_path(script, run_name="__main__")
