// Syntax-check stub (see ../../README.md): Edge-LLM 0.11.0 kernels/posEncoding/initializeCosSinCache.h,
// the MRoPE initializer the runner calls (cache [batch, maxPositions, rotaryDim] fp32 from int64
// position ids [batch, 3, maxPositions]; sectionH / sectionW in frequency pairs).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>
namespace trt_edgellm
{
namespace kernel
{
void initializeMRopeCosSin(float* cosSinCache, int64_t* mropePositionIds, float rotaryBaseFrequency, int64_t rotaryDim,
    int64_t rotaryEmbeddingMaxPositions, int64_t batchSize, bool interleaved, int32_t sectionH, int32_t sectionW,
    cudaStream_t stream);
} // namespace kernel
} // namespace trt_edgellm
