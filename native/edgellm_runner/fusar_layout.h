// fusar_layout: the host-side rules of the FUSAR runner for TensorRT Edge-LLM, with no
// dependency on Edge-LLM, TensorRT or CUDA (C++17 and the standard library only).
//
// Everything here has a Python reference in fusar-edge, and tests/test_edgellm_runner.py
// compiles this file with g++ and compares it with that reference on a manifest written by
// `fusar-edge export --edgellm`:
//
//   readManifest       <- fusar_edge/export/edgellm.py manifest()      (fusar_edgellm.json)
//   buildSequence      <- fusar_edge.tokenizer.build_sequence
//   joinIds            <- fusar_edge.export.edgellm.join_reference      (explicit form) and the
//                         manifest's "counting_form"
//   mropePositions     <- fusar_edge.model.rope.mrope_positions
//   chipToPatches      <- fusar_edge.model.preprocess.chip_to_patches
//   tlmWeights         <- fusar_edge.backends.tlm_host.tlm_weights_numpy
//   questionMask       <- fusar_edge.export.edgellm_graphs.GraspStage's mask (question_pass)
//
// fusar_sar_runner.{h,cpp} (Edge-LLM's side) calls these; they never touch a GPU.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace fusar
{

// ---- a small JSON reader (the manifest is plain JSON; Edge-LLM's nlohmann is not needed here)
class Json
{
public:
    enum class Kind
    {
        kNull,
        kBool,
        kNumber,
        kString,
        kArray,
        kObject
    };

    static Json parse(std::string const& text);
    static Json parseFile(std::string const& path);

    Kind kind() const noexcept { return mKind; }
    bool isNull() const noexcept { return mKind == Kind::kNull; }
    bool has(std::string const& key) const;
    //! member `key` of an object; throws naming the path when absent
    Json const& at(std::string const& key) const;
    Json const& at(size_t i) const;
    size_t size() const;
    std::vector<std::string> keys() const;
    double number() const;
    int64_t integer() const;
    bool boolean() const;
    std::string const& string() const;

private:
    Kind mKind{Kind::kNull};
    bool mBool{false};
    double mNumber{0.0};
    std::string mString;
    std::vector<Json> mArray;
    std::vector<std::pair<std::string, Json>> mObject;
    std::string mPath{"$"}; // where this value sits, for error messages

    friend class JsonParser;
};

// ---- fusar_edgellm.json, the fields the runner reads
struct EngineInput
{
    std::string name;
    std::vector<int64_t> shape;
    std::string dtype;
};

struct EngineSpec
{
    std::string onnx;
    std::vector<EngineInput> inputs;
    std::vector<std::string> outputs;
    EngineInput const* input(std::string const& name) const;
};

struct Manifest
{
    std::string format;           // "fusar-edgellm-v1"
    std::string edgellmVersion;   // edgellm.version, "0.11.0"
    int32_t layers{0};            // llm_config.layers
    int32_t hiddenSize{0};        // llm_config.hidden_size (C)
    int32_t vocabSize{0};         // llm_config.vocab_size == sequence.vocab_size
    int32_t chipSize{0};          // chip.size (pixels per side)
    int32_t patchGridH{0}, patchGridW{0};
    int32_t tokenGridH{0}, tokenGridW{0};
    int32_t patchSize{0}, mergeSize{0}, temporalPatchSize{0}; // derived: chip / patch grid / token grid / vision input
    bool anchorsEnabled{false};
    int32_t maxAnchors{0};        // S, anchor_weights' columns
    int32_t anchorVecDim{0};      // 64
    double anchorSigma{0.0}, anchorEps{0.0};
    std::string systemPrompt;
    int32_t visualTokens{0};      // T
    int32_t graspSlots{0};        // P (0: no GRASP)
    int32_t imageTokenId{-1};
    std::map<std::string, int32_t> specialIds; // <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|>, ...
    std::vector<int32_t> stopIds;
    std::vector<int32_t> mropeSection; // [t, h, w] frequency pairs; empty when the manifest has null
    double ropeTheta{0.0};
    int32_t questionMaxTokens{0};  // question_pass.max_tokens (Q); 0 without GRASP
    EngineSpec vision;            // engines["vision.onnx"]
    bool hasGrasp{false};
    EngineSpec grasp;             // engines["grasp.onnx"] when hasGrasp

    int32_t specialId(std::string const& token) const;
};

//! Reads and checks fusar_edgellm.json; throws std::runtime_error naming the first missing or
//! inconsistent field.
Manifest readManifest(std::string const& path);
Manifest manifestFromJson(Json const& root);

//! The JSON paths readManifest always reads, "/"-separated (keys may hold dots: "vision.onnx"),
//! for the test that keeps it in sync with the export; with GRASP it also reads engines/grasp.onnx.
std::vector<std::string> const& manifestKeysRead();

// ---- the chat sequence (fusar_edge.tokenizer.build_sequence)
struct ChatSequence
{
    std::vector<int32_t> ids;         // placeholders as the torch model has them: <|image_pad|> x T, <|endoftext|> x P
    std::vector<int32_t> questionIds; // the prompt's ids alone (GRASP's question pass)
    int32_t imageStart{0}, imageLen{0};
    int32_t promptStart{0}, promptLen{0};
};

//! `encodeText` encodes plain text without special tokens (Edge-LLM's Tokenizer::encode, or
//! the Python tokenizer in the test); the special tokens come from the manifest's ids. HF
//! tokenizers split on special tokens before BPE, so piecewise encoding is the same as
//! encoding the whole templated string.
ChatSequence buildSequence(Manifest const& m, std::string const& prompt,
    std::function<std::vector<int32_t>(std::string const&)> const& encodeText);

enum class IdForm
{
    kExplicit, //!< image token k -> vocab_size + k, GRASP slot j -> vocab_size + T + j
    kCounting  //!< image_token_id at all T + P positions (numbered 0..T+P-1 in order by the runtime)
};

//! The ids the LLM engine gets: row k of [visual_tokens; prompt_embeds] replaces placeholder k.
std::vector<int32_t> joinIds(ChatSequence const& seq, Manifest const& m, IdForm form);

//! The multimodal row each position takes (-1: a text token), the same for either IdForm.
std::vector<int32_t> multimodalRows(ChatSequence const& seq);

//! M-RoPE positions [3, seqLen] (axis-major) and the next position. `padTo` > seqLen fills the
//! tail as text continuing after the last token (where generated tokens go), the layout of
//! Edge-LLM's per-batch position buffer [3, maxPositions].
struct Positions
{
    std::vector<int64_t> ids; // [3 * length], axis-major
    int64_t length{0};
    int64_t next{0};          // position of the first token after seqLen
};
Positions mropePositions(int64_t seqLen, int64_t imageStart, int32_t h, int32_t w, int64_t padTo = 0);

//! RGB uint8 [H, W, 3] -> pixel_values [N, 3 * t * p * p] (fp32, the vision engine's order).
std::vector<float> chipToPatches(uint8_t const* rgb, int32_t height, int32_t width, int32_t patchSize,
    int32_t mergeSize, int32_t temporalPatchSize);

//! TLM's anchor matrix A [T, columns]: anchors' Gaussian maps over the patch grid, normalised,
//! masked, bilinear-resized to the token grid (align_corners=False); columns past the set's S
//! are zero (= masked). positions [S, 2] are normalised (y, x); mask [S] nonzero = valid.
//! Throws when no anchor is valid (the caller then feeds all-zero weights: the plain tower).
std::vector<float> tlmWeights(std::vector<float> const& positions, std::vector<uint8_t> const& mask, int32_t patchH,
    int32_t patchW, int32_t tokenH, int32_t tokenW, double sigma, double eps, int32_t columns);

//! question_mask [Q]: 1 on the question's n rows; refuses n > Q (a question is never cut).
std::vector<float> questionMask(int32_t n, int32_t maxTokens);

} // namespace fusar
