// FusarSarRunner: FUSAR's vision side as a MultimodalRunner of TensorRT Edge-LLM 0.11.0's C++
// runtime. It fills the LLM's multimodal embedding rows from our two TensorRT engines:
//
//   rows 0..T-1    vision engine (ViT + merger + TLM):  pixel_values [N, D], anchor_weights [T, S],
//                  anchor_features [S, 64]  ->  visual_tokens [T, C]
//   rows T..T+P-1  GRASP engine: visual_tokens [T, C], question_hidden [Q, C], question_mask [Q]
//                  ->  prompt_embeds [P, C]   (and grasp_weights, unused here)
//
// and builds the ids and M-RoPE positions the join needs (fusar_layout.h, checked against the
// Python references in tests/test_edgellm_runner.py).
//
// The engine directory (the runner's "multimodal engine dir") holds:
//   visual.engine        trtexec of edgellm/vision.onnx (MultimodalRunner's base class loads it by
//                        this name and owns its context memory)
//   grasp.engine         trtexec of edgellm/grasp.onnx (only with GRASP)
//   fusar_edgellm.json   the export's manifest
//   config.json          {"model_type": "fusar_sar"}, the key of the factory branch below
//
// What Edge-LLM 0.11.0 does not offer, and how this runner gets around it (docs/jetson.md):
//
// 1. No way to register a runner: MultimodalRunner::create() (multimodal/common/multimodalRunner.cpp)
//    picks the runner from config.json's model_type in a fixed if/else chain, and neither
//    LLMInferenceRuntime's constructors nor ModelArtifacts take a runner built by the caller. The
//    runtime therefore needs one added branch in create(), before its model-type chain
//    (docs/jetson.md, step 5, gives the exact lines):
//        if (modelTypeStr == "fusar_sar" && fusar::makeFusarSarRunner)
//            return fusar::makeFusarSarRunner(multimodalEngineDir, llmMaxBatchSize, llmMaxPositionEmbeddings, stream);
//    with makeFusarSarRunner declared weak there, so Edge-LLM's own examples still link without it.
//    Without that change this file still builds, but the runtime never constructs a FusarSarRunner.
// 2. No per-request side inputs for a multimodal runner: LLMGenerationRequest carries images and
//    audio, not AEF anchors or another pass's hidden states. The caller hands them over through
//    fusar::pendingInputs() before handleRequest(); one request at a time (batch 1).
// 3. The question pass's hidden states come through LLMInferenceRuntime::getBaseModelHiddenStates(),
//    the buffer 0.11 fills for Qwen3-Omni's Thinker -> Talker hand-off when handleRequest() is called
//    with outputThinkerEmbeddings = true and request.acceptHiddenLayer = k. Whether 0.11 binds that
//    buffer to the `hidden_states` output of a qwen2_5_vl engine (not a Qwen3-Omni Thinker) is not
//    known here: fusar_edgellm_run refuses with a clear message when it comes back null.
#pragma once

#include "fusar_layout.h"

#include "common/tensor.h"
#include "multimodal/common/multimodalRunner.h"

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <memory>
#include <string>
#include <vector>

namespace fusar
{

//! What one request brings besides the chip and the prompt (see 2. above). Set before
//! LLMInferenceRuntime::handleRequest(), read by FusarSarRunner::preprocess().
struct PendingInputs
{
    //! AEF anchors as libfusar_tiles returns them: positions [S, 2] normalised (y, x), mask [S],
    //! features [S, 64]. Empty: no anchors (all-zero anchor_weights, the plain tower).
    std::vector<float> anchorPositions;
    std::vector<uint8_t> anchorMask;
    std::vector<float> anchorFeatures;
    //! The question pass: its token ids and the LLM's pre-norm hidden states over them, fp16 on the
    //! GPU, row-major [questionIds.size(), hiddenSize] (not owned; valid until the next handleRequest).
    std::vector<int32_t> questionIds;
    void const* questionHidden{nullptr};
    int64_t questionHiddenRows{0};
};

PendingInputs& pendingInputs();

class FusarSarRunner final : public trt_edgellm::rt::MultimodalRunner
{
public:
    //! Loads engineDir/visual.engine (base class), engineDir/grasp.engine and the manifest.
    FusarSarRunner(std::string const& engineDir, int32_t llmMaxBatchSize, int64_t llmMaxPositionEmbeddings,
        cudaStream_t stream);
    ~FusarSarRunner() noexcept override = default;

    bool preprocess(trt_edgellm::rt::LLMGenerationRequest const& request,
        std::vector<std::vector<int32_t>>& batchedInputIds, trt_edgellm::tokenizer::Tokenizer const* tokenizer,
        trt_edgellm::rt::OptionalOutputTensor mropeCosSinOut, cudaStream_t stream, bool imageOnly = false,
        bool skipEncoderWork = false) override;

    bool infer(cudaStream_t stream) override;

    trt_edgellm::rt::MultimodalOutputSpec getOutputEmbeddingSpec() const override;
    int64_t estimateInputTokens(trt_edgellm::rt::LLMGenerationRequest const& request) override;
    int64_t estimateOutputTokens(trt_edgellm::rt::LLMGenerationRequest const& request) override;
    int64_t maxInputTokens() const noexcept override;

    bool validateAndFillConfig(std::string const& engineDir) override;
    bool allocateBuffer(cudaStream_t stream) override;

    Manifest const& manifest() const noexcept { return mManifest; }

    //! The ids of the last preprocess() (counting form), for tests and logs.
    ChatSequence const& lastSequence() const noexcept { return mLastSequence; }

private:
    //! Text-only request (the question pass goes through here when the runtime routes every
    //! request to its multimodal runner): ids as given, positions (i, i, i).
    bool preprocessTextOnly(trt_edgellm::rt::LLMGenerationRequest const& request,
        std::vector<std::vector<int32_t>>& batchedInputIds, trt_edgellm::tokenizer::Tokenizer const* tokenizer,
        trt_edgellm::rt::OptionalOutputTensor mropeCosSinOut, cudaStream_t stream);
    void writeMropeCosSin(Positions const& positions, trt_edgellm::rt::Tensor& cosSin, cudaStream_t stream);
    void uploadHalf(std::vector<float> const& host, trt_edgellm::rt::Tensor& device, cudaStream_t stream);
    void checkEngineIO(nvinfer1::ICudaEngine const& engine, EngineSpec const& spec, char const* what) const;

    std::string mEngineDir;
    int32_t mLLMMaxBatchSize{0};
    int64_t mLLMMaxPositionEmbeddings{0};
    Manifest mManifest;
    ChatSequence mLastSequence;
    bool mHaveImage{false};

    std::unique_ptr<nvinfer1::ICudaEngine> mGraspEngine;
    std::unique_ptr<nvinfer1::IExecutionContext> mGraspContext;

    trt_edgellm::rt::Tensor mPixels;         //!< pixel_values [N, D] fp16
    trt_edgellm::rt::Tensor mAnchorWeights;  //!< [T, S] fp16
    trt_edgellm::rt::Tensor mAnchorFeatures; //!< [S, 64] fp16
    trt_edgellm::rt::Tensor mQuestionHidden; //!< [Q, C] fp16, zero past the question
    trt_edgellm::rt::Tensor mQuestionMask;   //!< [Q] fp16
    trt_edgellm::rt::Tensor mGraspWeights;   //!< grasp_weights, fp32 (not used by the join)
    trt_edgellm::rt::Tensor mPositions;      //!< [3, maxPositions] int64 staging for the cos/sin kernel
    // mOutputEmbedding (base class): [T + P, C] fp16; the vision engine writes rows 0..T-1 in place,
    // the GRASP engine reads them and writes rows T..T+P-1.
};

//! For the one branch Edge-LLM's MultimodalRunner::create() needs (see 1. above).
std::unique_ptr<trt_edgellm::rt::MultimodalRunner> makeFusarSarRunner(std::string const& engineDir,
    int32_t llmMaxBatchSize, int64_t llmMaxPositionEmbeddings, cudaStream_t stream);

} // namespace fusar
