// Syntax-check stub (see ../README.md): Edge-LLM 0.11.0 runtime/llmInferenceRuntime.h -- the
// constructor and the calls fusar_edgellm_run makes.
#pragma once
#include "common/tensor.h"
#include "runtime/llmRuntimeUtils.h"
#include <cuda_runtime_api.h>
#include <string>
#include <unordered_map>
#include <vector>
namespace trt_edgellm
{
namespace rt
{
struct ContextCacheConfig
{
};
class LLMInferenceRuntime
{
public:
    LLMInferenceRuntime(std::string const& engineDir, std::string const& multimodalEngineDir,
        std::unordered_map<std::string, std::string> const& loraWeightsMap, cudaStream_t stream,
        ContextCacheConfig const& contextCacheConfig = {}, std::string const& checkpointDir = "");
    ~LLMInferenceRuntime() noexcept;
    bool handleRequest(LLMGenerationRequest const& request, LLMGenerationResponse& response, cudaStream_t stream,
        bool outputThinkerEmbeddings = false);
    rt::Tensor const* getBaseModelHiddenStates(int32_t layerIdx) const;
    int32_t getBaseModelPrefillLength() const;
    std::vector<std::vector<int32_t>> const& getBaseModelInputTokenIds() const;
};
} // namespace rt
} // namespace trt_edgellm
