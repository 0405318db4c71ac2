// Which scans of history_topk this build's target ISA has (the build uses -march=native; a build with
// METACLM_PORTABLE=1 targets plain x86-64). The ISA-specific code is guarded in its own header by the
// macros; everything else reads the constexpr flags.
#pragma once

// The query-vector scan (heads of 8 dimensions) needs AVX-512 F and DQ; without them every head
// takes the row-vector scan.
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define METACLM_QUERY_VECTOR_SCAN 1
#else
#define METACLM_QUERY_VECTOR_SCAN 0
#endif
// The int8 screen (heads of 64k dimensions) needs AVX-512 VNNI and BW; without them such heads take the
// fp32 row-vector scan.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define METACLM_INT8_SCREEN 1
#else
#define METACLM_INT8_SCREEN 0
#endif

namespace metaclm::topk {

constexpr bool kHaveQueryVectorScan = METACLM_QUERY_VECTOR_SCAN;
constexpr bool kHaveInt8Screen = METACLM_INT8_SCREEN;

}  // namespace metaclm::topk
