// FusarSarRunner: see fusar_sar_runner.h. Written against TensorRT Edge-LLM 0.11.0's C++ runtime
// (multimodal/common/multimodalRunner.h, runtime/llmRuntimeUtils.h, runtime/imageUtils.h,
// kernels/posEncoding/initializeCosSinCache.h, common/trtUtils.h) and TensorRT 10's
// enqueueV3 API; built on a Jetson only (native/edgellm_runner/CMakeLists.txt).
#include "fusar_sar_runner.h"

#include "common/trtUtils.h"
#include "kernels/posEncoding/initializeCosSinCache.h"
#include "multimodal/common/modelTypes.h"
#include "runtime/imageUtils.h"
#include "runtime/llmRuntimeUtils.h"
#include "tokenizer/tokenizer.h"

#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace fusar
{
namespace rt = trt_edgellm::rt;
using nvinfer1::DataType;

namespace
{
constexpr char const* kManifest = "/fusar_edgellm.json";
constexpr char const* kGraspEngine = "/grasp.engine";

void cudaCheck(cudaError_t err, char const* what)
{
    if (err != cudaSuccess)
        throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

//! Encode plain text with Edge-LLM's tokenizer (no BOS/EOS; special tokens come from the manifest).
std::vector<int32_t> encodeWith(trt_edgellm::tokenizer::Tokenizer const& tokenizer, std::string const& text)
{
    auto const ranks = tokenizer.encode(text, false, false);
    return std::vector<int32_t>(ranks.begin(), ranks.end());
}

//! The user turn's text: every "text" content of the request's last user message, in order.
std::string promptText(rt::LLMGenerationRequest::Request const& req)
{
    std::string text;
    for (auto it = req.messages.rbegin(); it != req.messages.rend(); ++it)
    {
        if (it->role != "user")
            continue;
        for (auto const& c : it->contents)
            if (c.type == "text")
                text += c.content;
        break;
    }
    return text;
}

//! Errors go to stderr: Edge-LLM's LOG_* macros name `format::fmtstr` unqualified, which resolves
//! only inside namespace trt_edgellm.
void logError(char const* where, std::exception const& e)
{
    std::fprintf(stderr, "[fusar] %s: %s\n", where, e.what());
}
} // namespace

PendingInputs& pendingInputs()
{
    static PendingInputs inputs;
    return inputs;
}

FusarSarRunner::FusarSarRunner(
    std::string const& engineDir, int32_t llmMaxBatchSize, int64_t llmMaxPositionEmbeddings, cudaStream_t stream)
    : rt::MultimodalRunner(engineDir, stream) // loads engineDir/visual.engine; its context memory is
                                              // user-managed and the runtime assigns it (setContextMemory),
                                              // as for its own vision runners
    , mEngineDir(engineDir)
    , mLLMMaxBatchSize(llmMaxBatchSize)
    , mLLMMaxPositionEmbeddings(llmMaxPositionEmbeddings)
{
    // The runtime keys its Qwen-family handling (the M-RoPE cos/sin buffer it passes to preprocess)
    // on the runner's model type; FUSAR's language model is Qwen2.5-VL's.
    mModelType = trt_edgellm::multimodal::ModelType::QWEN2_5_VL;
    if (!validateAndFillConfig(engineDir))
        throw std::runtime_error("FusarSarRunner: " + engineDir + kManifest + " does not match the engines");
    if (!allocateBuffer(stream))
        throw std::runtime_error("FusarSarRunner: buffer allocation failed");
}

void FusarSarRunner::checkEngineIO(nvinfer1::ICudaEngine const& engine, EngineSpec const& spec, char const* what) const
{
    for (auto const& in : spec.inputs)
    {
        nvinfer1::Dims const d = engine.getTensorShape(in.name.c_str());
        bool same = d.nbDims == static_cast<int32_t>(in.shape.size());
        for (int32_t i = 0; same && i < d.nbDims; ++i)
            same = d.d[i] == in.shape[static_cast<size_t>(i)];
        if (!same)
            throw std::runtime_error(std::string(what) + ": input " + in.name
                + " differs from fusar_edgellm.json (rebuild the engine from this export's ONNX)");
        if (engine.getTensorDataType(in.name.c_str()) != DataType::kHALF)
            throw std::runtime_error(std::string(what) + ": input " + in.name + " is not fp16");
    }
    for (auto const& out : spec.outputs)
        if (engine.getTensorIOMode(out.c_str()) != nvinfer1::TensorIOMode::kOUTPUT)
            throw std::runtime_error(std::string(what) + ": no output " + out);
}

bool FusarSarRunner::validateAndFillConfig(std::string const& engineDir)
{
    try
    {
        mManifest = readManifest(engineDir + kManifest);
        checkEngineIO(*mVisualEngine, mManifest.vision, "visual.engine");
        if (mManifest.hasGrasp)
        {
            mGraspEngine = trt_edgellm::deserializeCudaEngineFromFile(*mRuntime, engineDir + kGraspEngine);
            if (!mGraspEngine)
                throw std::runtime_error("cannot load " + engineDir + kGraspEngine);
            checkEngineIO(*mGraspEngine, mManifest.grasp, "grasp.engine");
            // A small engine: its own context and device memory, outside the runtime's shared pool.
            mGraspContext.reset(mGraspEngine->createExecutionContext());
            if (!mGraspContext)
                throw std::runtime_error("grasp.engine: no execution context");
        }
        if (mManifest.mropeSection.size() != 3)
            throw std::runtime_error("fusar_edgellm.json: mrope.mrope_section must be [t, h, w]");
        return true;
    }
    catch (std::exception const& e)
    {
        logError("FusarSarRunner", e);
        return false;
    }
}

bool FusarSarRunner::allocateBuffer(cudaStream_t stream)
{
    try
    {
        Manifest const& m = mManifest;
        EngineInput const* pixels = m.vision.input("pixel_values");
        int64_t const t = m.visualTokens, c = m.hiddenSize;
        mPixels = rt::Tensor({pixels->shape[0], pixels->shape[1]}, rt::DeviceType::kGPU, DataType::kHALF,
            "fusar_pixel_values");
        if (m.anchorsEnabled)
        {
            mAnchorWeights
                = rt::Tensor({t, int64_t{m.maxAnchors}}, rt::DeviceType::kGPU, DataType::kHALF, "fusar_anchor_weights");
            mAnchorFeatures = rt::Tensor({int64_t{m.maxAnchors}, int64_t{m.anchorVecDim}}, rt::DeviceType::kGPU,
                DataType::kHALF, "fusar_anchor_features");
        }
        mOutputEmbedding
            = rt::Tensor({t + m.graspSlots, c}, rt::DeviceType::kGPU, DataType::kHALF, "fusar_multimodal_rows");
        if (m.hasGrasp)
        {
            int64_t const q = m.questionMaxTokens;
            mQuestionHidden = rt::Tensor({q, c}, rt::DeviceType::kGPU, DataType::kHALF, "fusar_question_hidden");
            mQuestionMask = rt::Tensor({q}, rt::DeviceType::kGPU, DataType::kHALF, "fusar_question_mask");
            nvinfer1::Dims const w = mGraspEngine->getTensorShape("grasp_weights");
            int64_t n = 1;
            for (int32_t i = 0; i < w.nbDims; ++i)
                n *= w.d[i];
            mGraspWeights = rt::Tensor({n}, rt::DeviceType::kGPU, DataType::kFLOAT, "fusar_grasp_weights");
        }
        mPositions = rt::Tensor({int64_t{3} * mLLMMaxPositionEmbeddings}, rt::DeviceType::kGPU, DataType::kINT64,
            "fusar_mrope_positions");
        (void) stream;
        return true;
    }
    catch (std::exception const& e)
    {
        logError("FusarSarRunner", e);
        return false;
    }
}

void FusarSarRunner::uploadHalf(std::vector<float> const& host, rt::Tensor& device, cudaStream_t stream)
{
    if (static_cast<int64_t>(host.size() * sizeof(__half)) > device.getMemoryCapacity())
        throw std::runtime_error("FusarSarRunner: host data larger than its device buffer");
    std::vector<__half> half(host.size());
    std::transform(host.begin(), host.end(), half.begin(), [](float v) { return __float2half_rn(v); });
    cudaCheck(cudaMemcpyAsync(device.rawPointer(), half.data(), half.size() * sizeof(__half), cudaMemcpyHostToDevice,
                  stream),
        "upload");
    cudaCheck(cudaStreamSynchronize(stream), "upload"); // `half` leaves scope
}

void FusarSarRunner::writeMropeCosSin(Positions const& positions, rt::Tensor& cosSin, cudaStream_t stream)
{
    // Edge-LLM's MRoPE cache is [batch, maxPositions, rotaryDim] fp32, filled from int64 position
    // ids laid out [batch, 3, maxPositions] (QwenViTRunner::generateMropeParams does the same for
    // Qwen's own rule; ours differs only in where the GRASP slots sit: after <|vision_end|>, as text).
    auto const shape = cosSin.getShape();
    int64_t const maxPositions = shape[1], rotaryDim = shape[2];
    if (positions.length != maxPositions || maxPositions > mLLMMaxPositionEmbeddings)
        throw std::runtime_error("FusarSarRunner: position buffer does not match the runtime's M-RoPE cache");
    cudaCheck(cudaMemcpyAsync(mPositions.rawPointer(), positions.ids.data(), positions.ids.size() * sizeof(int64_t),
                  cudaMemcpyHostToDevice, stream),
        "positions upload");
    trt_edgellm::kernel::initializeMRopeCosSin(cosSin.dataPointer<float>(), mPositions.dataPointer<int64_t>(),
        static_cast<float>(mManifest.ropeTheta), rotaryDim, maxPositions, /*batchSize=*/1, /*interleaved=*/false,
        mManifest.mropeSection[1], mManifest.mropeSection[2], stream);
    cudaCheck(cudaStreamSynchronize(stream), "M-RoPE cos/sin"); // the host positions leave scope
}

bool FusarSarRunner::preprocessTextOnly(rt::LLMGenerationRequest const& request,
    std::vector<std::vector<int32_t>>& batchedInputIds, trt_edgellm::tokenizer::Tokenizer const* tokenizer,
    rt::OptionalOutputTensor mropeCosSinOut, cudaStream_t stream)
{
    std::vector<int32_t> ids;
    if (!request.preTokenizedInputIds.empty())
        ids = request.preTokenizedInputIds.front();
    else if (!request.requests.front().formatted.formattedCompleteRequest.empty())
        ids = encodeWith(*tokenizer, request.requests.front().formatted.formattedCompleteRequest);
    else
        ids = encodeWith(*tokenizer, promptText(request.requests.front()));
    batchedInputIds.assign(1, ids);
    mHaveImage = false;
    mLastMediaTokenLengths.clear();
    if (mropeCosSinOut.has_value())
    {
        rt::Tensor& cosSin = mropeCosSinOut->get();
        Positions p;
        p.length = cosSin.getShape()[1];
        p.ids.resize(static_cast<size_t>(3 * p.length));
        for (int axis = 0; axis < 3; ++axis)
            for (int64_t i = 0; i < p.length; ++i)
                p.ids[static_cast<size_t>(axis * p.length + i)] = i;
        p.next = static_cast<int64_t>(ids.size());
        writeMropeCosSin(p, cosSin, stream);
    }
    return true;
}

bool FusarSarRunner::preprocess(rt::LLMGenerationRequest const& request, std::vector<std::vector<int32_t>>& batchedInputIds,
    trt_edgellm::tokenizer::Tokenizer const* tokenizer, rt::OptionalOutputTensor mropeCosSinOut, cudaStream_t stream,
    bool imageOnly, bool skipEncoderWork)
{
    try
    {
        if (request.requests.size() != 1)
            throw std::runtime_error("FUSAR runs one request at a time (batch 1)");
        auto const& req = request.requests.front();
        if (req.imageBuffers.empty())
            return preprocessTextOnly(request, batchedInputIds, tokenizer, mropeCosSinOut, stream);
        if (req.imageBuffers.size() != 1)
            throw std::runtime_error("one SAR chip per request");
        Manifest const& m = mManifest;
        PendingInputs const& extra = pendingInputs();

        // Edge-LLM's encoder embedding cache keys on the image alone; FUSAR's rows also depend on the
        // anchors and (GRASP) the question, so a cache hit would hand back another request's rows.
        if (skipEncoderWork && (m.anchorsEnabled || m.hasGrasp))
            throw std::runtime_error("an encoder-embedding cache hit cannot be reused: FUSAR's rows depend on the "
                                     "anchors and the question too; run without Edge-LLM's encoder embedding cache");
        if (!skipEncoderWork)
        {
            // Pixels: the chip exactly at the bundle's size (no resize: a SAR chip is cut, not scaled).
            rt::imageUtils::ImageData const& chip = req.imageBuffers.front();
            if (chip.width != m.chipSize || chip.height != m.chipSize || chip.frames != 1 || chip.data() == nullptr)
                throw std::runtime_error("the chip must be one host RGB image of " + std::to_string(m.chipSize) + " x "
                    + std::to_string(m.chipSize) + " pixels");
            uploadHalf(chipToPatches(chip.data(), m.chipSize, m.chipSize, m.patchSize, m.mergeSize,
                           m.temporalPatchSize),
                mPixels, stream);
            // Anchors: A [T, S] and features [S, 64], zero-padded; none (or none valid) -> A = 0.
            if (m.anchorsEnabled)
            {
                size_t const s = extra.anchorMask.size();
                bool const any = std::any_of(extra.anchorMask.begin(), extra.anchorMask.end(), [](uint8_t v) { return v; });
                std::vector<float> weights(static_cast<size_t>(m.visualTokens) * m.maxAnchors, 0.0F);
                std::vector<float> features(static_cast<size_t>(m.maxAnchors) * m.anchorVecDim, 0.0F);
                if (any)
                {
                    weights = tlmWeights(extra.anchorPositions, extra.anchorMask, m.patchGridH, m.patchGridW,
                        m.tokenGridH, m.tokenGridW, m.anchorSigma, m.anchorEps, m.maxAnchors);
                    if (extra.anchorFeatures.size() != s * static_cast<size_t>(m.anchorVecDim))
                        throw std::runtime_error("anchor features must be [S, " + std::to_string(m.anchorVecDim) + "]");
                    std::copy(extra.anchorFeatures.begin(), extra.anchorFeatures.end(), features.begin());
                }
                uploadHalf(weights, mAnchorWeights, stream);
                uploadHalf(features, mAnchorFeatures, stream);
            }
        }
        if (imageOnly)
            return true;

        // Ids: the chat sequence with image_token_id at all T + P multimodal positions (0.11's
        // embedding lookup numbers them 0..T+P-1 in order: row k of [visual; prompt] -> position k).
        mLastSequence = buildSequence(
            m, promptText(req), [&](std::string const& text) { return encodeWith(*tokenizer, text); });
        batchedInputIds.assign(1, joinIds(mLastSequence, m, IdForm::kCounting));
        mLastMediaTokenLengths.assign(1, int64_t{m.visualTokens} + m.graspSlots);

        // GRASP: the question pass's hidden states for exactly these question ids.
        if (m.hasGrasp)
        {
            if (extra.questionHidden == nullptr || extra.questionIds != mLastSequence.questionIds)
                throw std::runtime_error("GRASP needs the question pass over this prompt's ids first "
                                         "(fusar::pendingInputs().questionHidden)");
            int32_t const n = static_cast<int32_t>(mLastSequence.questionIds.size());
            std::vector<float> const mask = questionMask(n, m.questionMaxTokens); // refuses n > Q
            if (extra.questionHiddenRows != n)
                throw std::runtime_error("question pass returned " + std::to_string(extra.questionHiddenRows)
                    + " rows for " + std::to_string(n) + " question tokens");
            size_t const rowBytes = static_cast<size_t>(m.hiddenSize) * sizeof(__half);
            cudaCheck(cudaMemsetAsync(mQuestionHidden.rawPointer(), 0, rowBytes * m.questionMaxTokens, stream),
                "question rows");
            cudaCheck(cudaMemcpyAsync(mQuestionHidden.rawPointer(), extra.questionHidden, rowBytes * n,
                          cudaMemcpyDeviceToDevice, stream),
                "question rows");
            uploadHalf(mask, mQuestionMask, stream);
        }

        // M-RoPE: text (i, i, i); image token (r, c) at p: (p, p + r, p + c); after the image,
        // including the GRASP slots and every generated token, p + max(h, w) onwards.
        if (mropeCosSinOut.has_value())
        {
            rt::Tensor& cosSin = mropeCosSinOut->get();
            writeMropeCosSin(mropePositions(static_cast<int64_t>(mLastSequence.ids.size()), mLastSequence.imageStart,
                                 m.tokenGridH, m.tokenGridW, cosSin.getShape()[1]),
                cosSin, stream);
        }
        mHaveImage = true;
        return true;
    }
    catch (std::exception const& e)
    {
        logError("FusarSarRunner::preprocess", e);
        return false;
    }
}

bool FusarSarRunner::infer(cudaStream_t stream)
{
    try
    {
        if (!mHaveImage)
            return true; // text-only request: no rows to fill
        Manifest const& m = mManifest;
        auto* rows = static_cast<char*>(mOutputEmbedding.rawPointer());
        bool ok = mVisualContext->setTensorAddress("pixel_values", mPixels.rawPointer())
            && mVisualContext->setTensorAddress("visual_tokens", rows);
        if (m.anchorsEnabled)
            ok = ok && mVisualContext->setTensorAddress("anchor_weights", mAnchorWeights.rawPointer())
                && mVisualContext->setTensorAddress("anchor_features", mAnchorFeatures.rawPointer());
        if (!ok || !mVisualContext->enqueueV3(stream))
            throw std::runtime_error("visual.engine: enqueue failed");
        if (m.hasGrasp)
        {
            size_t const visualBytes = static_cast<size_t>(m.visualTokens) * m.hiddenSize * sizeof(__half);
            ok = mGraspContext->setTensorAddress("visual_tokens", rows)
                && mGraspContext->setTensorAddress("question_hidden", mQuestionHidden.rawPointer())
                && mGraspContext->setTensorAddress("question_mask", mQuestionMask.rawPointer())
                && mGraspContext->setTensorAddress("prompt_embeds", rows + visualBytes)
                && mGraspContext->setTensorAddress("grasp_weights", mGraspWeights.rawPointer());
            if (!ok || !mGraspContext->enqueueV3(stream))
                throw std::runtime_error("grasp.engine: enqueue failed");
        }
        return true;
    }
    catch (std::exception const& e)
    {
        logError("FusarSarRunner::infer", e);
        return false;
    }
}

rt::MultimodalOutputSpec FusarSarRunner::getOutputEmbeddingSpec() const
{
    rt::MultimodalOutputSpec spec;
    spec.shape = rt::Coords{int64_t{mManifest.visualTokens} + mManifest.graspSlots, int64_t{mManifest.hiddenSize}};
    spec.dataType = DataType::kHALF;
    return spec;
}

int64_t FusarSarRunner::estimateInputTokens(rt::LLMGenerationRequest const& request)
{
    return request.requests.size() == 1 && !request.requests.front().imageBuffers.empty() ? maxInputTokens() : 0;
}

int64_t FusarSarRunner::estimateOutputTokens(rt::LLMGenerationRequest const& request)
{
    return request.requests.size() == 1 && !request.requests.front().imageBuffers.empty()
        ? int64_t{mManifest.visualTokens} + mManifest.graspSlots
        : 0;
}

int64_t FusarSarRunner::maxInputTokens() const noexcept
{
    return int64_t{mManifest.patchGridH} * mManifest.patchGridW;
}

std::unique_ptr<rt::MultimodalRunner> makeFusarSarRunner(
    std::string const& engineDir, int32_t llmMaxBatchSize, int64_t llmMaxPositionEmbeddings, cudaStream_t stream)
{
    return std::make_unique<FusarSarRunner>(engineDir, llmMaxBatchSize, llmMaxPositionEmbeddings, stream);
}

} // namespace fusar
