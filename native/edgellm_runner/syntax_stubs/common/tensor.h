// Syntax-check stub (see ../README.md): Edge-LLM 0.11.0 common/tensor.h, the parts the runner uses.
#pragma once
#include <NvInfer.h>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <optional>
#include <string>

namespace trt_edgellm
{
namespace rt
{
enum class DeviceType : int32_t
{
    kGPU = 0,
    kCPU = 1
};

class Coords
{
public:
    Coords() = default;
    Coords(std::initializer_list<int64_t> init);
    int32_t getNumDims() const noexcept;
    int64_t& operator[](int32_t idx);
    int64_t operator[](int32_t idx) const;
    int64_t volume() const noexcept;
};

class Tensor
{
public:
    Tensor() noexcept = default;
    Tensor(Tensor const& other) = delete;
    Tensor& operator=(Tensor const& other) = delete;
    Tensor(Tensor&& other) noexcept;
    Tensor& operator=(Tensor&& other) noexcept;
    ~Tensor() noexcept;
    Tensor(Coords const& extent, DeviceType deviceType, nvinfer1::DataType dataType, std::string const& name = "");
    Coords getShape() const noexcept;
    bool isEmpty() const noexcept;
    int64_t getMemoryCapacity() const noexcept;
    void const* rawPointer() const noexcept;
    void* rawPointer() noexcept;
    template <typename T>
    T* dataPointer() noexcept;
    template <typename T>
    T const* dataPointer() const noexcept;
    [[nodiscard]] bool reshape(Coords extent) noexcept;
};

using OptionalInputTensor = std::optional<std::reference_wrapper<rt::Tensor const>>;
using OptionalOutputTensor = std::optional<std::reference_wrapper<rt::Tensor>>;
} // namespace rt
} // namespace trt_edgellm
