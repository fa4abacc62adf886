// Syntax-check stub (see ../README.md): Edge-LLM 0.11.0 common/trtUtils.h, the part the runner uses.
#pragma once
#include <NvInfer.h>
#include <filesystem>
#include <memory>

namespace trt_edgellm
{
std::unique_ptr<nvinfer1::ICudaEngine> deserializeCudaEngineFromFile(
    nvinfer1::IRuntime& runtime, std::filesystem::path const& enginePath);
} // namespace trt_edgellm
