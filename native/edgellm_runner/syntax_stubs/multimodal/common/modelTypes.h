// Syntax-check stub (see ../../README.md): Edge-LLM 0.11.0 multimodal/common/modelTypes.h (subset).
#pragma once
namespace trt_edgellm
{
namespace multimodal
{
enum class ModelType
{
    QWEN2_VL,
    QWEN2_5_VL,
    QWEN3_VL
};
} // namespace multimodal
} // namespace trt_edgellm
