// layout_check: runs fusar_layout's rules on a manifest and a request written by
// tests/test_edgellm_runner.py, which compares the results with fusar-edge's Python
// references. Needs no GPU, TensorRT or Edge-LLM:
//
//   g++ -std=c++17 -ffp-contract=off fusar_layout.cpp layout_check.cpp -o layout_check
//   layout_check --keys                       the manifest paths the runner reads, one a line
//   layout_check MANIFEST REQUEST.json        results as JSON on stdout; patches / anchor
//                                             weights as raw float32 into the request's paths
//
// REQUEST.json: {"prompt": str, "encodings": {text: [ids], ...} (the Python tokenizer's
// encode of every plain-text piece, as Edge-LLM's Tokenizer::encode would give them),
// "pad_to": int, "chip": path (raw RGB uint8 H*W*3) or "", "patches_out": path,
// "anchor_positions": [y0, x0, y1, x1, ...], "anchor_mask": [0/1, ...], "weights_out": path,
// "question_tokens": [n, ...] (question lengths to try against question_pass.max_tokens)}.
#include "fusar_layout.h"

#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

namespace
{
template <typename T>
void printArray(std::ostream& os, std::vector<T> const& v)
{
    os << '[';
    for (size_t i = 0; i < v.size(); ++i)
        os << (i ? "," : "") << v[i];
    os << ']';
}

void writeRaw(std::string const& path, std::vector<float> const& v)
{
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<char const*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(float)));
    if (!out)
        throw std::runtime_error("cannot write " + path);
}
} // namespace

int main(int argc, char** argv)
{
    using namespace fusar;
    try
    {
        if (argc == 2 && std::string(argv[1]) == "--keys")
        {
            for (auto const& k : manifestKeysRead())
                std::cout << k << '\n';
            return 0;
        }
        if (argc != 3)
        {
            std::cerr << "usage: layout_check --keys | layout_check MANIFEST REQUEST.json\n";
            return 2;
        }
        Manifest const m = readManifest(argv[1]);
        Json const req = Json::parseFile(argv[2]);
        Json const& enc = req.at("encodings");
        auto encode = [&](std::string const& text) {
            if (!enc.has(text))
                throw std::runtime_error("request has no encoding of " + text);
            std::vector<int32_t> ids;
            Json const& a = enc.at(text);
            for (size_t i = 0; i < a.size(); ++i)
                ids.push_back(static_cast<int32_t>(a.at(i).integer()));
            return ids;
        };
        ChatSequence const seq = buildSequence(m, req.at("prompt").string(), encode);
        Positions const pos = mropePositions(static_cast<int64_t>(seq.ids.size()), seq.imageStart, m.tokenGridH,
            m.tokenGridW, req.at("pad_to").integer());

        std::ostringstream os;
        os << "{\"manifest\":{\"T\":" << m.visualTokens << ",\"P\":" << m.graspSlots << ",\"C\":" << m.hiddenSize
           << ",\"vocab\":" << m.vocabSize << ",\"patch\":" << m.patchSize << ",\"merge\":" << m.mergeSize
           << ",\"temporal\":" << m.temporalPatchSize << ",\"S\":" << m.maxAnchors << ",\"Q\":" << m.questionMaxTokens
           << ",\"grasp\":" << (m.hasGrasp ? "true" : "false") << ",\"mrope_section\":";
        printArray(os, m.mropeSection);
        os << "},\"ids\":";
        printArray(os, seq.ids);
        os << ",\"question_ids\":";
        printArray(os, seq.questionIds);
        os << ",\"layout\":[" << seq.imageStart << ',' << seq.imageLen << ',' << seq.promptStart << ','
           << seq.promptLen << "],\"explicit\":";
        printArray(os, joinIds(seq, m, IdForm::kExplicit));
        os << ",\"counting\":";
        printArray(os, joinIds(seq, m, IdForm::kCounting));
        os << ",\"rows\":";
        printArray(os, multimodalRows(seq));
        os << ",\"positions\":";
        printArray(os, pos.ids);
        os << ",\"positions_length\":" << pos.length << ",\"next\":" << pos.next;

        std::string const chip = req.at("chip").string();
        if (!chip.empty())
        {
            std::ifstream in(chip, std::ios::binary);
            std::vector<uint8_t> rgb(static_cast<size_t>(m.chipSize) * m.chipSize * 3);
            in.read(reinterpret_cast<char*>(rgb.data()), static_cast<std::streamsize>(rgb.size()));
            if (!in)
                throw std::runtime_error("short chip file " + chip);
            writeRaw(req.at("patches_out").string(),
                chipToPatches(rgb.data(), m.chipSize, m.chipSize, m.patchSize, m.mergeSize, m.temporalPatchSize));
        }
        Json const& ap = req.at("anchor_positions");
        Json const& am = req.at("anchor_mask");
        std::vector<float> positions;
        std::vector<uint8_t> mask;
        for (size_t i = 0; i < ap.size(); ++i)
            positions.push_back(static_cast<float>(ap.at(i).number()));
        for (size_t i = 0; i < am.size(); ++i)
            mask.push_back(static_cast<uint8_t>(am.at(i).integer() != 0));
        if (!mask.empty())
            writeRaw(req.at("weights_out").string(),
                tlmWeights(positions, mask, m.patchGridH, m.patchGridW, m.tokenGridH, m.tokenGridW, m.anchorSigma,
                    m.anchorEps, m.maxAnchors));

        os << ",\"question_masks\":[";
        Json const& qs = req.at("question_tokens");
        for (size_t i = 0; i < qs.size(); ++i)
        {
            os << (i ? "," : "");
            try
            {
                std::vector<float> const q = questionMask(static_cast<int32_t>(qs.at(i).integer()), m.questionMaxTokens);
                double sum = 0.0;
                for (float v : q)
                    sum += v;
                os << "{\"rows\":" << q.size() << ",\"ones\":" << sum << '}';
            }
            catch (std::runtime_error const& e)
            {
                os << "{\"refused\":\"" << e.what() << "\"}";
            }
        }
        os << "]}";
        std::cout << os.str() << '\n';
        return 0;
    }
    catch (std::exception const& e)
    {
        std::cerr << "layout_check: " << e.what() << '\n';
        return 1;
    }
}
