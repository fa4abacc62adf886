// fusar_edgellm_run: one FUSAR question on a Jetson, through TensorRT Edge-LLM 0.11.0.
//
//   fusar_edgellm_run --llm engines/llm --fusar engines/fusar --chip chip.png --prompt TEXT
//                     [--tiles STORE --bbox LON_MIN,LAT_MIN,LON_MAX,LAT_MAX --year YEAR [--grid ROWS COLS]]
//                     [--allow-no-coverage] [--max-new-tokens N]
//
// 1. anchors: libfusar_tiles looks the chip's box up in the AEF tile store (grid 16 x 16 by default,
//    as `fusar-edge ask --tiles --grid`); no --tiles: no anchors (the plain tower).
// 2. question pass (GRASP only): the prompt's ids alone through the LLM engine, one token
//    generated, its `hidden_states` (pre-norm, every prompt row) copied out.
// 3. the request: chip + prompt; FusarSarRunner (registered as the runtime's multimodal runner, see
//    fusar_sar_runner.h) fills the T + P multimodal rows from the vision and GRASP engines, the ids
//    and the M-RoPE cache; Edge-LLM prefills and decodes (greedy).
// 4. prints the answer text; parse it as fusar_edge.tasks does.
//
// --prompt is the text the model is sent, i.e. fusar_edge.tasks.build_prompt(task, question)
// (docs/jetson.md, step 5, prints it with a Python one-liner); the runner adds the chat template.
#include "fusar_layout.h"
#include "fusar_sar_runner.h"

#include "fusar_tiles.h"

#include "runtime/imageUtils.h"
#include "runtime/llmInferenceRuntime.h"
#include "runtime/llmRuntimeUtils.h"

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace
{
namespace rt = trt_edgellm::rt;

struct Args
{
    std::string llmDir, fusarDir, chip, prompt, tiles;
    double bbox[4]{0, 0, 0, 0};
    bool haveBbox{false};
    int year{0}, gridRows{16}, gridCols{16};
    bool allowNoCoverage{false};
    int64_t maxNewTokens{128};
};

[[noreturn]] void usage(std::string const& why)
{
    std::cerr << "fusar_edgellm_run: " << why << "\n"
              << "usage: fusar_edgellm_run --llm ENGINE_DIR --fusar FUSAR_ENGINE_DIR --chip IMAGE --prompt TEXT\n"
                 "         [--tiles STORE --bbox LON_MIN,LAT_MIN,LON_MAX,LAT_MAX --year YEAR [--grid ROWS COLS]]\n"
                 "         [--allow-no-coverage] [--max-new-tokens N]\n";
    std::exit(2);
}

Args parse(int argc, char** argv)
{
    Args a;
    for (int i = 1; i < argc; ++i)
    {
        std::string const k = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc)
                usage(k + " needs a value");
            return argv[++i];
        };
        if (k == "--llm")
            a.llmDir = next();
        else if (k == "--fusar")
            a.fusarDir = next();
        else if (k == "--chip")
            a.chip = next();
        else if (k == "--prompt")
            a.prompt = next();
        else if (k == "--tiles")
            a.tiles = next();
        else if (k == "--year")
            a.year = std::stoi(next());
        else if (k == "--grid")
        {
            a.gridRows = std::stoi(next());
            a.gridCols = std::stoi(next());
        }
        else if (k == "--bbox")
        {
            std::stringstream ss(next());
            std::string part;
            for (int j = 0; j < 4; ++j)
            {
                if (!std::getline(ss, part, ','))
                    usage("--bbox takes LON_MIN,LAT_MIN,LON_MAX,LAT_MAX");
                a.bbox[j] = std::stod(part);
            }
            a.haveBbox = true;
        }
        else if (k == "--allow-no-coverage")
            a.allowNoCoverage = true;
        else if (k == "--max-new-tokens")
            a.maxNewTokens = std::stoll(next());
        else
            usage("unknown option " + k);
    }
    if (a.llmDir.empty() || a.fusarDir.empty() || a.chip.empty() || a.prompt.empty())
        usage("--llm, --fusar, --chip and --prompt are required");
    if (!a.tiles.empty() && (!a.haveBbox || a.year == 0))
        usage("--tiles needs --bbox and --year");
    return a;
}

void check(cudaError_t err, char const* what)
{
    if (err != cudaSuccess)
        throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

//! 1. AEF anchors for the chip's box, as `fusar-edge` looks them up (libfusar_tiles).
void lookupAnchors(Args const& a, fusar::Manifest const& m, fusar::PendingInputs& out)
{
    out.anchorPositions.clear();
    out.anchorMask.clear();
    out.anchorFeatures.clear();
    if (a.tiles.empty() || !m.anchorsEnabled)
        return;
    int const s = a.gridRows * a.gridCols;
    if (s > m.maxAnchors)
        throw std::runtime_error("--grid " + std::to_string(a.gridRows) + " " + std::to_string(a.gridCols) + " is "
            + std::to_string(s) + " anchors; the vision engine takes " + std::to_string(m.maxAnchors));
    char err[512] = {0};
    fusar_tiles* store = nullptr;
    if (fusar_tiles_open(a.tiles.c_str(), &store, err, sizeof err) != 0)
        throw std::runtime_error(std::string("tile store: ") + err);
    int const year = fusar_tiles_pick_year(store, a.year);
    out.anchorFeatures.resize(static_cast<size_t>(s) * FUSAR_TILES_VEC_DIM);
    out.anchorPositions.resize(static_cast<size_t>(s) * 2);
    out.anchorMask.resize(static_cast<size_t>(s));
    long const valid = year < 0 ? year
                                : fusar_tiles_lookup_bbox(store, year, a.bbox[0], a.bbox[1], a.bbox[2], a.bbox[3],
                                    a.gridRows, a.gridCols, out.anchorFeatures.data(), out.anchorPositions.data(),
                                    out.anchorMask.data());
    fusar_tiles_close(store);
    if (valid < 0)
        throw std::runtime_error(std::string("tile store lookup: ") + fusar_tiles_strerror(static_cast<int>(valid)));
    if (valid == 0 && !a.allowNoCoverage)
        throw std::runtime_error("no AEF data under the box (--allow-no-coverage runs the plain tower)");
}

rt::Message userMessage(std::string const& prompt, bool withImage)
{
    rt::Message msg;
    msg.role = "user";
    if (withImage)
        msg.contents.push_back({"image", ""});
    msg.contents.push_back({"text", prompt});
    return msg;
}

void greedy(rt::LLMGenerationRequest& r, int64_t maxNewTokens)
{
    r.temperature = 1.0F;
    r.topP = 1.0F;
    r.topK = 1; // greedy, as the bundle's generation_config
    r.maxGenerateLength = maxNewTokens;
    r.disableSpecDecode = true;
}
} // namespace

int main(int argc, char** argv)
{
    Args const args = parse(argc, argv);
    cudaStream_t stream = nullptr;
    void* questionRows = nullptr;
    try
    {
        check(cudaStreamCreate(&stream), "cudaStreamCreate");
        fusar::Manifest const m = fusar::readManifest(args.fusarDir + "/fusar_edgellm.json");
        fusar::PendingInputs& extra = fusar::pendingInputs();
        lookupAnchors(args, m, extra);

        // The runtime builds its multimodal runner from args.fusarDir/config.json: with the one-branch
        // patch of MultimodalRunner::create() (fusar_sar_runner.h, 1.), that is a FusarSarRunner.
        rt::LLMInferenceRuntime runtime(args.llmDir, args.fusarDir, {}, stream);

        // 2. The question pass: the prompt alone, no template, positions 0..n-1; keep its hidden states.
        extra.questionIds.clear();
        extra.questionHidden = nullptr;
        extra.questionHiddenRows = 0;
        if (m.hasGrasp)
        {
            rt::LLMGenerationRequest q;
            q.requests.resize(1);
            q.requests[0].messages.push_back(userMessage(args.prompt, false));
            q.applyChatTemplate = false; // raw text, no special tokens: the prompt's ids alone
            q.addGenerationPrompt = false;
            greedy(q, 1);
            q.acceptHiddenLayer = m.layers; // HF hidden_states[k]: after k decoder layers, pre-norm
            rt::LLMGenerationResponse qr;
            if (!runtime.handleRequest(q, qr, stream, /*outputThinkerEmbeddings=*/true))
                throw std::runtime_error("question pass: handleRequest failed");
            rt::Tensor const* hidden = runtime.getBaseModelHiddenStates(m.layers);
            if (hidden == nullptr)
                throw std::runtime_error("question pass: Edge-LLM returned no hidden states for layer "
                    + std::to_string(m.layers) + "; this runtime does not bind the engine's hidden_states output "
                    "for this model (see docs/jetson.md, \"What is verified\")");
            extra.questionIds = runtime.getBaseModelInputTokenIds().at(0);
            int64_t const n = runtime.getBaseModelPrefillLength();
            if (n != static_cast<int64_t>(extra.questionIds.size()))
                throw std::runtime_error("question pass: prefill length differs from its ids");
            // The runtime reuses that buffer at the next handleRequest: copy the rows out now.
            size_t const bytes = static_cast<size_t>(n) * m.hiddenSize * 2; // fp16
            check(cudaMalloc(&questionRows, bytes), "cudaMalloc");
            check(cudaMemcpyAsync(questionRows, hidden->rawPointer(), bytes, cudaMemcpyDeviceToDevice, stream),
                "question rows");
            check(cudaStreamSynchronize(stream), "question rows");
            extra.questionHidden = questionRows;
            extra.questionHiddenRows = n;
        }

        // 3. The request: chip + prompt; FusarSarRunner fills the rows, ids and M-RoPE cache.
        rt::LLMGenerationRequest req;
        req.requests.resize(1);
        req.requests[0].messages.push_back(userMessage(args.prompt, true));
        req.requests[0].imageBuffers.push_back(rt::imageUtils::loadRgbImageFromFile(args.chip));
        req.requests[0].imageBuffers.back().doResize = false;
        greedy(req, args.maxNewTokens);
        rt::LLMGenerationResponse resp;
        if (!runtime.handleRequest(req, resp, stream))
            throw std::runtime_error("handleRequest failed");

        // 4. The answer.
        std::cout << resp.outputTexts.at(0) << std::endl;
        cudaFree(questionRows);
        cudaStreamDestroy(stream);
        return 0;
    }
    catch (std::exception const& e)
    {
        std::cerr << "fusar_edgellm_run: " << e.what() << std::endl;
        if (questionRows)
            cudaFree(questionRows);
        if (stream)
            cudaStreamDestroy(stream);
        return 1;
    }
}
