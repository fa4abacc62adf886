// Syntax-check stub (see ../README.md): Edge-LLM 0.11.0 runtime/imageUtils.h (subset).
#pragma once
#include "common/tensor.h"
#include <cstdint>
#include <memory>
#include <string>
namespace trt_edgellm
{
namespace rt
{
namespace imageUtils
{
class ImageData
{
public:
    std::shared_ptr<rt::Tensor> buffer;
    int64_t width{0};
    int64_t height{0};
    int64_t channels{0};
    int64_t frames{1};
    double fps{1.0};
    bool doResize{true};
    bool isVideo{false};
    ImageData() noexcept = default;
    unsigned char* data() const noexcept;
};
ImageData loadRgbImageFromFile(std::string const& path);
} // namespace imageUtils
} // namespace rt
} // namespace trt_edgellm
