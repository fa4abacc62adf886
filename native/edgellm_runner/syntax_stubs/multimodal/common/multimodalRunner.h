// Syntax-check stub (see ../../README.md): Edge-LLM 0.11.0 multimodal/common/multimodalRunner.h --
// the MultimodalRunner members a subclass sees (pure virtuals, the virtuals FusarSarRunner
// overrides, the protected members it uses), signatures as in 0.11.0.
#pragma once
#include "common/tensor.h"
#include "multimodal/common/modelTypes.h"
#include "runtime/llmRuntimeUtils.h"
#include "tokenizer/tokenizer.h"
#include <NvInfer.h>
#include <cuda_runtime_api.h>
#include <memory>
#include <string>
#include <vector>
namespace trt_edgellm
{
namespace rt
{
struct MultimodalOutputSpec
{
    Coords shape;
    nvinfer1::DataType dataType{nvinfer1::DataType::kFLOAT};
};

class MultimodalRunner
{
public:
    MultimodalRunner() noexcept = default;
    MultimodalRunner(std::string const& engineDir, cudaStream_t stream);
    virtual ~MultimodalRunner() noexcept = default;

    virtual bool preprocess(rt::LLMGenerationRequest const& request, std::vector<std::vector<int32_t>>& batchedInputIds,
        tokenizer::Tokenizer const* tokenizer, [[maybe_unused]] rt::OptionalOutputTensor mropeCosSinOut,
        cudaStream_t stream, bool imageOnly = false, bool skipEncoderWork = false) = 0;
    virtual bool infer(cudaStream_t stream) = 0;
    virtual rt::Tensor& getOutputEmbedding();
    virtual MultimodalOutputSpec getOutputEmbeddingSpec() const;
    virtual int64_t estimateInputTokens(rt::LLMGenerationRequest const& request);
    virtual int64_t estimateOutputTokens(rt::LLMGenerationRequest const& request);
    virtual int64_t maxInputTokens() const noexcept;
    virtual bool validateAndFillConfig(std::string const& engineDir) = 0;
    virtual bool allocateBuffer(cudaStream_t stream) = 0;

protected:
    multimodal::ModelType mModelType;
    std::unique_ptr<nvinfer1::IRuntime> mRuntime;
    std::unique_ptr<nvinfer1::ICudaEngine> mVisualEngine;
    std::unique_ptr<nvinfer1::IExecutionContext> mVisualContext;
    rt::Tensor mOutputEmbedding;
    std::vector<int64_t> mLastMediaTokenLengths;
};
} // namespace rt
} // namespace trt_edgellm
