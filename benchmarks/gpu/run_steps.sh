#!/bin/bash
# One device call of checks and timings; each step under its own time limit, logs in $OUT.
# usage: bash benchmarks/gpu/run_steps.sh STEP...   (the steps are the case labels below)
set -u
G=benchmarks/gpu
P="python3 $G/run_patched.py"
step() {  # step NAME SECONDS CMD...
  local name=$1 lim=$2; shift 2
  local t0=$(date +%s)
  echo "=== $name (limit ${lim}s) $(date +%H:%M:%S)"
  timeout $lim "$@" > $OUT/$name.txt 2>&1
  echo "=== $name rc=$? $(( $(date +%s) - t0 ))s"
  grep -v "NumbaPerformanceWarning\|warn(errors" $OUT/$name.txt | tail -${TAILN:-25}
}
for s in "$@"; do case $s in
  fwd_check) step fwd_check 240 python3 $G/check_flash_attention.py check ;;
  fwd_bench) step fwd_bench 150 python3 $G/check_flash_attention.py bench ;;
  fwd_check_lean) step fwd_check_lean 240 $P "import numba_kernels.cuda.flash_attention as m; m.TC_ROWLOAD = True; m.TC_LAZY = True" $G/check_flash_attention.py check ;;
  fwd_bench_rowload) step fwd_bench_rowload 150 $P "import numba_kernels.cuda.flash_attention as m; m.TC_ROWLOAD = True" $G/check_flash_attention.py bench ;;
  fwd_bench_lean) step fwd_bench_lean 150 $P "import numba_kernels.cuda.flash_attention as m; m.TC_ROWLOAD = True; m.TC_LAZY = True" $G/check_flash_attention.py bench ;;
  fwd_check_rowbounds) step fwd_check_rowbounds 240 $P "import numba_kernels.cuda.flash_attention as m; m.TC_ROWBOUNDS = True" $G/check_flash_attention.py check ;;
  fwd_bench_rowbounds) step fwd_bench_rowbounds 150 $P "import numba_kernels.cuda.flash_attention as m; m.TC_ROWBOUNDS = True" $G/check_flash_attention.py bench ;;
  fwd_bench_plain) step fwd_bench_plain 150 $P "import numba_kernels.cuda._intrinsics as i; i.ldsm_x4_o = i.ldsm_x4; i.ldsm_x4_t_o = i.ldsm_x4_t" $G/check_flash_attention.py bench ;;
  dec_extra) step dec_extra 240 python3 $G/check_decode_attention.py extra ;;
  dec_check) step dec_check 240 python3 $G/check_decode_attention.py check --quick ;;
  dec_bench) step dec_bench 200 python3 $G/check_decode_attention.py bench --quick ;;
  dec_variants) step dec_variants ${VLIM:-450} python3 $G/check_decode_attention.py variants ;;
  dec_bench_notpf) step dec_bench_notpf 200 $P "import numba_kernels.cuda.decode_attention as m; m.TC_TILES['gpu'] = (4, 3, 16, False, False, False)" $G/check_decode_attention.py bench --quick ;;
  scan) step scan 300 python3 $G/check_selective_scan.py --quick ;;
  scan_bwd) step scan_bwd 200 python3 $G/check_selective_scan.py --bwd ;;
  fft_probe) step fft_probe 150 python3 $G/probe_fft_parts.py ;;
  fft_fused) step fft_fused 150 python3 $G/probe_fft_parts.py fused ;;
  fft_fused_check) step fft_fused_check 200 python3 $G/check_fft_fused.py ;;
  bwd_bench_1k) BWD_BENCH_D=64 BWD_BENCH_S=1024 step bwd_bench_1k 150 python3 $G/check_flash_attention_backward.py bench ;;
  fft) step fft 420 python3 $G/check_fft_conv.py --quick ;;
  bwd_check) step bwd_check 240 python3 $G/check_flash_attention_backward.py check=quick ;;
  bwd_bench) step bwd_bench 300 python3 $G/check_flash_attention_backward.py bench ;;
  bwd_check_qreg) step bwd_check_qreg 150 $P "import numba_kernels.cuda.flash_attention_backward as m; m.TC_BWD_DQ_QREG = True" $G/check_flash_attention_backward.py check=quick ;;
  bwd_bench_qreg) step bwd_bench_qreg 150 $P "import numba_kernels.cuda.flash_attention_backward as m; m.TC_BWD_DQ_QREG = True" $G/check_flash_attention_backward.py bench ;;
  bwd_sweep1k) step bwd_sweep1k 240 python3 $G/check_flash_attention_backward.py sweep1k ;;
  bwd_sweep) step bwd_sweep 400 python3 $G/check_flash_attention_backward.py sweep=330 ;;
  bwd_sweep_dq128) step bwd_sweep_dq128 200 python3 $G/check_flash_attention_backward.py sweep_dq128 ;;
  bwd_sweep128) SWEEP_D=128 step bwd_sweep128 300 python3 $G/check_flash_attention_backward.py sweep=280 ;;
  conv1d) step conv1d 150 python3 $G/check_causal_conv1d.py ;;
  fft_host) OLD_FFT_FUSED=${OLD_FFT_FUSED:-} step fft_host 240 python3 $G/probe_fft_host.py ;;
  fft_host_big) PROBE_L=2048,4096 NUMBA_KERNELS_FFT_FUSED_MAX_N=8192 OLD_FFT_FUSED=${OLD_FFT_FUSED:-} step fft_host_big 200 python3 $G/probe_fft_host.py ;;
  scan_ab) OLD_SCAN_BWD=${OLD_SCAN_BWD:-} step scan_ab 300 python3 $G/ab_scan_bwd.py ;;
  fft_gpu_tests) step fft_gpu_tests 300 python3 -m pytest -q -m gpu tests/test_fft_conv.py ;;
  dec_profile) step dec_profile 150 python3 $G/check_decode_attention.py profile ;;
  dec_small) step dec_small 200 python3 $G/probe_decode_small.py ;;
  dec_small_merge7) step dec_small_merge7 200 $P "import numba_kernels.cuda.decode_attention as m; m.FUSED_MERGE_MAX = 4" $G/probe_decode_small.py ;;
  dec_small_merge15) step dec_small_merge15 200 $P "import numba_kernels.cuda.decode_attention as m; m.FUSED_MERGE_MAX = 4; m.TC_TILES['gpu'] = m.TC_TILES['gpu'][:7] + (15,); m.TC_TILES_SMALL['gpu'] = m.TC_TILES_SMALL['gpu'][:7] + (15,)" $G/probe_decode_small.py ;;
  dec_check_merge15) step dec_check_merge15 240 $P "import numba_kernels.cuda.decode_attention as m; m.FUSED_MERGE_MAX = 16; m.TC_TILES['gpu'] = m.TC_TILES['gpu'][:7] + (15,); m.TC_TILES_SMALL['gpu'] = m.TC_TILES_SMALL['gpu'][:7] + (15,)" $G/check_decode_attention.py check --quick ;;
  wg_probe) step wg_probe 150 python3 $G/check_bwd_wgmma.py probe ;;
  wg_check) step wg_check 240 python3 $G/check_bwd_wgmma.py check ;;
  wg_profile) step wg_profile 150 python3 $G/check_bwd_wgmma.py profile ;;
  bwd_check_pipe) step bwd_check_pipe 240 $P "import numba_kernels.cuda.flash_attention_backward as m; m.TC_BWD_WGMMA_PIPE = True" $G/check_flash_attention_backward.py check=quick ;;
  bwd_bench_pipe) step bwd_bench_pipe 300 $P "import numba_kernels.cuda.flash_attention_backward as m; m.TC_BWD_WGMMA_PIPE = True" $G/check_flash_attention_backward.py bench ;;
  wg_dqpass) step wg_dqpass 300 python3 $G/check_bwd_wgmma.py dqpass ;;
  wg_bench) step wg_bench 300 python3 $G/check_bwd_wgmma.py bench ;;
  wgmma) step wgmma 90 python3 $G/probe_wgmma_run.py ;;
  dec_host) step dec_host 150 python3 $G/profile_decode_host.py ;;
  *) echo "unknown step $s" ;;
esac; done
