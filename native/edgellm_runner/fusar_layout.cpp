// fusar_layout: see fusar_layout.h. C++17, standard library only.
#include "fusar_layout.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace fusar
{

// ============================================================================ JSON

class JsonParser
{
public:
    explicit JsonParser(std::string const& text)
        : mText(text)
    {
    }

    Json document()
    {
        Json v = value("$");
        skip();
        if (mPos != mText.size())
        {
            fail("trailing characters");
        }
        return v;
    }

private:
    std::string const& mText;
    size_t mPos{0};

    [[noreturn]] void fail(std::string const& what) const
    {
        throw std::runtime_error("JSON: " + what + " at byte " + std::to_string(mPos));
    }

    void skip()
    {
        while (mPos < mText.size() && (mText[mPos] == ' ' || mText[mPos] == '\n' || mText[mPos] == '\r'
                   || mText[mPos] == '\t'))
        {
            ++mPos;
        }
    }

    bool literal(char const* word)
    {
        size_t const n = std::char_traits<char>::length(word);
        if (mText.compare(mPos, n, word) == 0)
        {
            mPos += n;
            return true;
        }
        return false;
    }

    static void appendUtf8(std::string& out, uint32_t cp)
    {
        if (cp < 0x80)
        {
            out += static_cast<char>(cp);
        }
        else if (cp < 0x800)
        {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
        else if (cp < 0x10000)
        {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
        else
        {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }

    uint32_t hex4()
    {
        if (mPos + 4 > mText.size())
        {
            fail("short \\u escape");
        }
        uint32_t v = 0;
        for (int i = 0; i < 4; ++i)
        {
            char const c = mText[mPos++];
            v <<= 4;
            if (c >= '0' && c <= '9')
                v |= static_cast<uint32_t>(c - '0');
            else if (c >= 'a' && c <= 'f')
                v |= static_cast<uint32_t>(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F')
                v |= static_cast<uint32_t>(c - 'A' + 10);
            else
                fail("bad \\u escape");
        }
        return v;
    }

    std::string str()
    {
        if (mText[mPos] != '"')
        {
            fail("expected a string");
        }
        ++mPos;
        std::string out;
        while (true)
        {
            if (mPos >= mText.size())
            {
                fail("unterminated string");
            }
            char const c = mText[mPos++];
            if (c == '"')
            {
                return out;
            }
            if (c != '\\')
            {
                out += c;
                continue;
            }
            char const e = mText[mPos++];
            switch (e)
            {
            case '"': out += '"'; break;
            case '\\': out += '\\'; break;
            case '/': out += '/'; break;
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'n': out += '\n'; break;
            case 'r': out += '\r'; break;
            case 't': out += '\t'; break;
            case 'u':
            {
                uint32_t cp = hex4();
                if (cp >= 0xD800 && cp < 0xDC00 && literal("\\u"))
                {
                    uint32_t const lo = hex4();
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                }
                appendUtf8(out, cp);
                break;
            }
            default: fail("bad escape");
            }
        }
    }

    Json value(std::string const& path)
    {
        skip();
        if (mPos >= mText.size())
        {
            fail("unexpected end");
        }
        Json v;
        v.mPath = path;
        char const c = mText[mPos];
        if (c == '{')
        {
            v.mKind = Json::Kind::kObject;
            ++mPos;
            skip();
            if (mText[mPos] == '}')
            {
                ++mPos;
                return v;
            }
            while (true)
            {
                skip();
                std::string key = str();
                skip();
                if (mText[mPos++] != ':')
                {
                    fail("expected ':'");
                }
                Json member = value(path + "." + key);
                v.mObject.emplace_back(std::move(key), std::move(member));
                skip();
                char const d = mText[mPos++];
                if (d == '}')
                    break;
                if (d != ',')
                    fail("expected ',' or '}'");
            }
        }
        else if (c == '[')
        {
            v.mKind = Json::Kind::kArray;
            ++mPos;
            skip();
            if (mText[mPos] == ']')
            {
                ++mPos;
                return v;
            }
            while (true)
            {
                v.mArray.push_back(value(path + "[" + std::to_string(v.mArray.size()) + "]"));
                skip();
                char const d = mText[mPos++];
                if (d == ']')
                    break;
                if (d != ',')
                    fail("expected ',' or ']'");
            }
        }
        else if (c == '"')
        {
            v.mKind = Json::Kind::kString;
            v.mString = str();
        }
        else if (literal("true"))
        {
            v.mKind = Json::Kind::kBool;
            v.mBool = true;
        }
        else if (literal("false"))
        {
            v.mKind = Json::Kind::kBool;
        }
        else if (literal("null"))
        {
            v.mKind = Json::Kind::kNull;
        }
        else
        {
            char const* begin = mText.c_str() + mPos;
            char* end = nullptr;
            v.mNumber = std::strtod(begin, &end);
            if (end == begin)
            {
                fail("unexpected character");
            }
            v.mKind = Json::Kind::kNumber;
            mPos += static_cast<size_t>(end - begin);
        }
        return v;
    }
};

Json Json::parse(std::string const& text)
{
    return JsonParser(text).document();
}

Json Json::parseFile(std::string const& path)
{
    std::ifstream in(path, std::ios::binary);
    if (!in)
    {
        throw std::runtime_error("cannot read " + path);
    }
    std::stringstream buf;
    buf << in.rdbuf();
    try
    {
        return parse(buf.str());
    }
    catch (std::runtime_error const& e)
    {
        throw std::runtime_error(path + ": " + e.what());
    }
}

bool Json::has(std::string const& key) const
{
    if (mKind != Kind::kObject)
        return false;
    for (auto const& kv : mObject)
        if (kv.first == key)
            return true;
    return false;
}

Json const& Json::at(std::string const& key) const
{
    if (mKind != Kind::kObject)
        throw std::runtime_error(mPath + ": not an object (looking for \"" + key + "\")");
    for (auto const& kv : mObject)
        if (kv.first == key)
            return kv.second;
    throw std::runtime_error(mPath + "." + key + ": missing");
}

Json const& Json::at(size_t i) const
{
    if (mKind != Kind::kArray || i >= mArray.size())
        throw std::runtime_error(mPath + "[" + std::to_string(i) + "]: missing");
    return mArray[i];
}

size_t Json::size() const
{
    if (mKind == Kind::kArray)
        return mArray.size();
    if (mKind == Kind::kObject)
        return mObject.size();
    throw std::runtime_error(mPath + ": not an array or object");
}

std::vector<std::string> Json::keys() const
{
    std::vector<std::string> out;
    for (auto const& kv : mObject)
        out.push_back(kv.first);
    return out;
}

double Json::number() const
{
    if (mKind != Kind::kNumber)
        throw std::runtime_error(mPath + ": not a number");
    return mNumber;
}

int64_t Json::integer() const
{
    double const v = number();
    if (v != std::floor(v))
        throw std::runtime_error(mPath + ": not an integer");
    return static_cast<int64_t>(v);
}

bool Json::boolean() const
{
    if (mKind != Kind::kBool)
        throw std::runtime_error(mPath + ": not true/false");
    return mBool;
}

std::string const& Json::string() const
{
    if (mKind != Kind::kString)
        throw std::runtime_error(mPath + ": not a string");
    return mString;
}

// ============================================================================ manifest

namespace
{
constexpr char const* kFormat = "fusar-edgellm-v1";
constexpr char const* kVision = "vision.onnx";
constexpr char const* kGrasp = "grasp.onnx";

int32_t i32(Json const& j)
{
    return static_cast<int32_t>(j.integer());
}

EngineSpec engineSpec(Json const& e)
{
    EngineSpec s;
    s.onnx = e.at("onnx").string();
    Json const& inputs = e.at("inputs");
    for (size_t i = 0; i < inputs.size(); ++i)
    {
        EngineInput in;
        in.name = inputs.at(i).at("name").string();
        in.dtype = inputs.at(i).at("dtype").string();
        Json const& shape = inputs.at(i).at("shape");
        for (size_t d = 0; d < shape.size(); ++d)
            in.shape.push_back(shape.at(d).integer());
        s.inputs.push_back(std::move(in));
    }
    Json const& outputs = e.at("outputs");
    for (size_t i = 0; i < outputs.size(); ++i)
        s.outputs.push_back(outputs.at(i).string());
    return s;
}

void require(bool ok, std::string const& what)
{
    if (!ok)
        throw std::runtime_error("fusar_edgellm.json: " + what);
}
} // namespace

EngineInput const* EngineSpec::input(std::string const& name) const
{
    for (auto const& in : inputs)
        if (in.name == name)
            return &in;
    return nullptr;
}

int32_t Manifest::specialId(std::string const& token) const
{
    auto it = specialIds.find(token);
    if (it == specialIds.end())
        throw std::runtime_error("fusar_edgellm.json: sequence.special_ids has no " + token);
    return it->second;
}

std::vector<std::string> const& manifestKeysRead()
{
    // Keep in step with manifestFromJson below (tests/test_edgellm_runner.py checks each path
    // exists in what fusar_edge/export/edgellm.py writes).
    static std::vector<std::string> const keys{"format", "edgellm/version", "llm_config/layers",
        "llm_config/hidden_size", "llm_config/vocab_size", "chip/size", "chip/patch_grid", "chip/token_grid",
        "anchors/enabled", "anchors/max_anchors", "anchors/vec_dim", "anchors/sigma", "anchors/eps",
        "sequence/system_prompt", "sequence/visual_tokens", "sequence/grasp_slots", "sequence/vocab_size",
        "sequence/image_token_id", "sequence/special_ids", "sequence/stop_ids", "mrope/mrope_section",
        "mrope/rope_theta", "question_pass/max_tokens", "engines/vision.onnx/onnx", "engines/vision.onnx/inputs",
        "engines/vision.onnx/outputs"};
    return keys;
}

Manifest manifestFromJson(Json const& root)
{
    Manifest m;
    m.format = root.at("format").string();
    require(m.format == kFormat, "format " + m.format + ", this runner reads " + kFormat);
    m.edgellmVersion = root.at("edgellm").at("version").string();
    Json const& llm = root.at("llm_config");
    m.layers = i32(llm.at("layers"));
    m.hiddenSize = i32(llm.at("hidden_size"));
    m.vocabSize = i32(llm.at("vocab_size"));

    Json const& chip = root.at("chip");
    m.chipSize = i32(chip.at("size"));
    m.patchGridH = i32(chip.at("patch_grid").at(0));
    m.patchGridW = i32(chip.at("patch_grid").at(1));
    m.tokenGridH = i32(chip.at("token_grid").at(0));
    m.tokenGridW = i32(chip.at("token_grid").at(1));
    require(m.patchGridH > 0 && m.chipSize % m.patchGridH == 0, "chip.size is not a multiple of chip.patch_grid");
    m.patchSize = m.chipSize / m.patchGridH;
    require(m.tokenGridH > 0 && m.patchGridH % m.tokenGridH == 0 && m.patchGridW % m.tokenGridW == 0,
        "chip.patch_grid is not a multiple of chip.token_grid");
    m.mergeSize = m.patchGridH / m.tokenGridH;

    Json const& anchors = root.at("anchors");
    m.anchorsEnabled = anchors.at("enabled").boolean();
    m.maxAnchors = i32(anchors.at("max_anchors"));
    m.anchorVecDim = i32(anchors.at("vec_dim"));
    m.anchorSigma = anchors.at("sigma").number();
    m.anchorEps = anchors.at("eps").number();

    Json const& seq = root.at("sequence");
    m.systemPrompt = seq.at("system_prompt").string();
    m.visualTokens = i32(seq.at("visual_tokens"));
    m.graspSlots = i32(seq.at("grasp_slots"));
    require(i32(seq.at("vocab_size")) == m.vocabSize, "sequence.vocab_size differs from llm_config.vocab_size");
    m.imageTokenId = i32(seq.at("image_token_id"));
    Json const& special = seq.at("special_ids");
    for (auto const& key : special.keys())
        m.specialIds[key] = i32(special.at(key));
    for (char const* token : {"<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"})
        (void) m.specialId(token); // required
    Json const& stops = seq.at("stop_ids");
    for (size_t i = 0; i < stops.size(); ++i)
        m.stopIds.push_back(i32(stops.at(i)));
    require(m.visualTokens == m.tokenGridH * m.tokenGridW, "sequence.visual_tokens != token_grid h * w");

    Json const& mrope = root.at("mrope");
    if (!mrope.at("mrope_section").isNull())
        for (size_t i = 0; i < mrope.at("mrope_section").size(); ++i)
            m.mropeSection.push_back(i32(mrope.at("mrope_section").at(i)));
    m.ropeTheta = mrope.at("rope_theta").isNull() ? 0.0 : mrope.at("rope_theta").number();
    m.questionMaxTokens = i32(root.at("question_pass").at("max_tokens"));

    Json const& engines = root.at("engines");
    m.vision = engineSpec(engines.at(kVision));
    EngineInput const* pixels = m.vision.input("pixel_values");
    require(pixels != nullptr && pixels->shape.size() == 2, "engines.vision.onnx has no pixel_values [N, D] input");
    require(pixels->shape[0] == int64_t{m.patchGridH} * m.patchGridW, "vision pixel_values rows != patch grid");
    int64_t const perFrame = int64_t{3} * m.patchSize * m.patchSize;
    require(pixels->shape[1] % perFrame == 0, "vision pixel_values width is not 3 * t * p * p");
    m.temporalPatchSize = static_cast<int32_t>(pixels->shape[1] / perFrame);
    if (m.anchorsEnabled)
    {
        EngineInput const* a = m.vision.input("anchor_weights");
        EngineInput const* f = m.vision.input("anchor_features");
        require(a && f, "anchors.enabled but vision.onnx has no anchor_weights / anchor_features");
        require(a->shape == std::vector<int64_t>{m.visualTokens, m.maxAnchors}, "anchor_weights is not [T, S]");
        require(f->shape == std::vector<int64_t>{m.maxAnchors, m.anchorVecDim}, "anchor_features is not [S, vec_dim]");
    }
    m.hasGrasp = m.graspSlots > 0;
    if (m.hasGrasp)
    {
        m.grasp = engineSpec(engines.at(kGrasp)); // read only with GRASP: not in manifestKeysRead
        EngineInput const* q = m.grasp.input("question_hidden");
        require(q && q->shape.size() == 2 && q->shape[0] == m.questionMaxTokens && q->shape[1] == m.hiddenSize,
            "grasp.onnx question_hidden is not [question_pass.max_tokens, hidden_size]");
    }
    return m;
}

Manifest readManifest(std::string const& path)
{
    return manifestFromJson(Json::parseFile(path));
}

// ============================================================================ sequence

ChatSequence buildSequence(Manifest const& m, std::string const& prompt,
    std::function<std::vector<int32_t>(std::string const&)> const& encodeText)
{
    auto append = [](std::vector<int32_t>& dst, std::vector<int32_t> const& src) {
        dst.insert(dst.end(), src.begin(), src.end());
    };
    int32_t const imStart = m.specialId("<|im_start|>");
    int32_t const imEnd = m.specialId("<|im_end|>");
    ChatSequence s;
    // <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>
    s.ids.push_back(imStart);
    append(s.ids, encodeText("system\n" + m.systemPrompt));
    s.ids.push_back(imEnd);
    append(s.ids, encodeText("\n"));
    s.ids.push_back(imStart);
    append(s.ids, encodeText("user\n"));
    s.ids.push_back(m.specialId("<|vision_start|>"));
    s.imageStart = static_cast<int32_t>(s.ids.size());
    s.imageLen = m.visualTokens;
    s.ids.insert(s.ids.end(), static_cast<size_t>(m.visualTokens), m.specialId("<|image_pad|>"));
    s.ids.push_back(m.specialId("<|vision_end|>"));
    s.promptStart = static_cast<int32_t>(s.ids.size());
    s.promptLen = m.graspSlots;
    if (m.graspSlots > 0)
        s.ids.insert(s.ids.end(), static_cast<size_t>(m.graspSlots), m.specialId("<|endoftext|>"));
    s.questionIds = encodeText(prompt);
    append(s.ids, s.questionIds);
    // <|im_end|>\n<|im_start|>assistant\n
    s.ids.push_back(imEnd);
    append(s.ids, encodeText("\n"));
    s.ids.push_back(imStart);
    append(s.ids, encodeText("assistant\n"));
    return s;
}

std::vector<int32_t> joinIds(ChatSequence const& seq, Manifest const& m, IdForm form)
{
    std::vector<int32_t> ids = seq.ids;
    for (int32_t k = 0; k < seq.imageLen; ++k)
        ids[seq.imageStart + k] = form == IdForm::kExplicit ? m.vocabSize + k : m.imageTokenId;
    for (int32_t j = 0; j < seq.promptLen; ++j)
        ids[seq.promptStart + j] = form == IdForm::kExplicit ? m.vocabSize + seq.imageLen + j : m.imageTokenId;
    return ids;
}

std::vector<int32_t> multimodalRows(ChatSequence const& seq)
{
    std::vector<int32_t> rows(seq.ids.size(), -1);
    for (int32_t k = 0; k < seq.imageLen; ++k)
        rows[seq.imageStart + k] = k;
    for (int32_t j = 0; j < seq.promptLen; ++j)
        rows[seq.promptStart + j] = seq.imageLen + j;
    return rows;
}

Positions mropePositions(int64_t seqLen, int64_t imageStart, int32_t h, int32_t w, int64_t padTo)
{
    int64_t const nImg = int64_t{h} * w;
    if (imageStart < 0 || imageStart + nImg > seqLen)
        throw std::runtime_error("M-RoPE: image tokens [" + std::to_string(imageStart) + ", "
            + std::to_string(imageStart + nImg) + ") do not fit a sequence of " + std::to_string(seqLen));
    Positions out;
    out.length = std::max(seqLen, padTo);
    out.ids.assign(static_cast<size_t>(3 * out.length), 0);
    auto at = [&](int axis, int64_t i) -> int64_t& { return out.ids[static_cast<size_t>(axis * out.length + i)]; };
    for (int64_t i = 0; i < imageStart; ++i)
        for (int axis = 0; axis < 3; ++axis)
            at(axis, i) = i;
    int64_t const p = imageStart;
    for (int64_t k = 0; k < nImg; ++k)
    {
        at(0, p + k) = p;
        at(1, p + k) = p + k / w;
        at(2, p + k) = p + k % w;
    }
    int64_t const after = p + std::max(h, w);
    for (int64_t i = p + nImg; i < out.length; ++i)
        for (int axis = 0; axis < 3; ++axis)
            at(axis, i) = after + (i - (p + nImg));
    out.next = after + (seqLen - (p + nImg));
    return out;
}

// ============================================================================ pixels, anchors

namespace
{
constexpr float kClipMean[3] = {0.48145466F, 0.4578275F, 0.40821073F};
constexpr float kClipStd[3] = {0.26862954F, 0.26130258F, 0.27577711F};
} // namespace

std::vector<float> chipToPatches(uint8_t const* rgb, int32_t height, int32_t width, int32_t patchSize,
    int32_t mergeSize, int32_t temporalPatchSize)
{
    int32_t const unit = patchSize * mergeSize;
    if (height % unit || width % unit)
        throw std::runtime_error("chip: sides must be multiples of " + std::to_string(unit));
    int32_t const gh = height / patchSize, gw = width / patchSize;
    int64_t const dim = int64_t{3} * temporalPatchSize * patchSize * patchSize;
    std::vector<float> out(static_cast<size_t>(int64_t{gh} * gw * dim));
    // Row order: merge windows (bh, bw) in raster order, then (mh, mw) inside each window;
    // column order: channel, frame, py, px. A still image repeats in every frame.
    int64_t row = 0;
    for (int32_t bh = 0; bh < gh / mergeSize; ++bh)
        for (int32_t bw = 0; bw < gw / mergeSize; ++bw)
            for (int32_t mh = 0; mh < mergeSize; ++mh)
                for (int32_t mw = 0; mw < mergeSize; ++mw, ++row)
                {
                    float* dst = out.data() + row * dim;
                    int32_t const y0 = (bh * mergeSize + mh) * patchSize, x0 = (bw * mergeSize + mw) * patchSize;
                    for (int32_t c = 0; c < 3; ++c)
                        for (int32_t t = 0; t < temporalPatchSize; ++t)
                            for (int32_t py = 0; py < patchSize; ++py)
                                for (int32_t px = 0; px < patchSize; ++px)
                                {
                                    uint8_t const v = rgb[(static_cast<int64_t>(y0 + py) * width + (x0 + px)) * 3 + c];
                                    float const x = static_cast<float>(v) / 255.0F; // numpy: float32 / 255.0
                                    *dst++ = (x - kClipMean[c]) / kClipStd[c];
                                }
                }
    return out;
}

namespace
{
//! One axis of torch's bilinear resize, align_corners=False: R [nOut, nIn].
std::vector<double> bilinear(int32_t nIn, int32_t nOut)
{
    std::vector<double> r(static_cast<size_t>(nOut) * nIn, 0.0);
    for (int32_t d = 0; d < nOut; ++d)
    {
        double const src = std::max((d + 0.5) * (static_cast<double>(nIn) / nOut) - 0.5, 0.0);
        int32_t const i0 = std::min(static_cast<int32_t>(std::floor(src)), nIn - 1);
        int32_t const i1 = std::min(i0 + 1, nIn - 1);
        double const lam = src - i0;
        r[static_cast<size_t>(d) * nIn + i0] += 1.0 - lam;
        r[static_cast<size_t>(d) * nIn + i1] += lam;
    }
    return r;
}
} // namespace

std::vector<float> tlmWeights(std::vector<float> const& positions, std::vector<uint8_t> const& mask, int32_t patchH,
    int32_t patchW, int32_t tokenH, int32_t tokenW, double sigma, double eps, int32_t columns)
{
    size_t const s = mask.size();
    if (positions.size() != 2 * s)
        throw std::runtime_error("tlmWeights: positions must be [S, 2] for a mask of S");
    if (static_cast<int64_t>(s) > columns)
        throw std::runtime_error("tlmWeights: " + std::to_string(s) + " anchors, the vision engine takes "
            + std::to_string(columns));
    if (std::none_of(mask.begin(), mask.end(), [](uint8_t v) { return v != 0; }))
        throw std::runtime_error("anchor mask: every anchor is masked out; feed all-zero anchor_weights instead");
    size_t const np = static_cast<size_t>(patchH) * patchW;
    std::vector<double> w(s * np);
    for (size_t a = 0; a < s; ++a)
        for (int32_t y = 0; y < patchH; ++y)
            for (int32_t x = 0; x < patchW; ++x)
            {
                double const dy = positions[2 * a] * (patchH - 1) - y;
                double const dx = positions[2 * a + 1] * (patchW - 1) - x;
                w[a * np + static_cast<size_t>(y) * patchW + x] = std::exp(-(dy * dy + dx * dx) / (2.0 * sigma * sigma));
            }
    auto normalise = [&]() {
        for (size_t i = 0; i < np; ++i)
        {
            double sum = 0.0;
            for (size_t a = 0; a < s; ++a)
                sum += w[a * np + i];
            for (size_t a = 0; a < s; ++a)
                w[a * np + i] = w[a * np + i] / (sum + eps);
        }
    };
    normalise();
    for (size_t a = 0; a < s; ++a)
        for (size_t i = 0; i < np; ++i)
            w[a * np + i] *= mask[a] ? 1.0 : 0.0;
    normalise();
    std::vector<double> const ry = bilinear(patchH, tokenH), rx = bilinear(patchW, tokenW);
    std::vector<float> out(static_cast<size_t>(tokenH) * tokenW * columns, 0.0F);
    std::vector<double> tmp(static_cast<size_t>(tokenH) * patchW);
    for (size_t a = 0; a < s; ++a)
    {
        double const* map = w.data() + a * np;
        for (int32_t ty = 0; ty < tokenH; ++ty) // rows: ry @ map
            for (int32_t x = 0; x < patchW; ++x)
            {
                double acc = 0.0;
                for (int32_t y = 0; y < patchH; ++y)
                    acc += ry[static_cast<size_t>(ty) * patchH + y] * map[static_cast<size_t>(y) * patchW + x];
                tmp[static_cast<size_t>(ty) * patchW + x] = acc;
            }
        for (int32_t ty = 0; ty < tokenH; ++ty) // columns: (.) @ rx^T
            for (int32_t tx = 0; tx < tokenW; ++tx)
            {
                double acc = 0.0;
                for (int32_t x = 0; x < patchW; ++x)
                    acc += tmp[static_cast<size_t>(ty) * patchW + x] * rx[static_cast<size_t>(tx) * patchW + x];
                out[(static_cast<size_t>(ty) * tokenW + tx) * columns + a] = static_cast<float>(acc);
            }
    }
    return out;
}

std::vector<float> questionMask(int32_t n, int32_t maxTokens)
{
    if (n < 1)
        throw std::runtime_error("question pass: the question has no tokens");
    if (n > maxTokens)
        throw std::runtime_error("question pass: the question is " + std::to_string(n) + " tokens, grasp.onnx takes "
            + std::to_string(maxTokens) + " (refused, never cut)");
    std::vector<float> mask(static_cast<size_t>(maxTokens), 0.0F);
    std::fill(mask.begin(), mask.begin() + n, 1.0F);
    return mask;
}

} // namespace fusar
