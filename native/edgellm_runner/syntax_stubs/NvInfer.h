// Syntax-check stub (see README.md): the TensorRT 10 declarations the FUSAR runner uses.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace nvinfer1
{
enum class DataType : int32_t
{
    kFLOAT = 0,
    kHALF = 1,
    kINT8 = 2,
    kINT32 = 3,
    kBOOL = 4,
    kUINT8 = 5,
    kFP8 = 6,
    kBF16 = 7,
    kINT64 = 8,
    kINT4 = 9
};
enum class TensorIOMode : int32_t
{
    kNONE = 0,
    kINPUT = 1,
    kOUTPUT = 2
};
class Dims64
{
public:
    static constexpr int32_t MAX_DIMS{8};
    int32_t nbDims;
    int64_t d[MAX_DIMS];
};
using Dims = Dims64;

class IExecutionContext
{
public:
    virtual ~IExecutionContext() noexcept = default;
    bool setTensorAddress(char const* tensorName, void* data) noexcept;
    bool enqueueV3(cudaStream_t stream) noexcept;
};

class ICudaEngine
{
public:
    virtual ~ICudaEngine() noexcept = default;
    Dims getTensorShape(char const* tensorName) const noexcept;
    DataType getTensorDataType(char const* tensorName) const noexcept;
    TensorIOMode getTensorIOMode(char const* tensorName) const noexcept;
    IExecutionContext* createExecutionContext() noexcept;
};

class IRuntime
{
public:
    virtual ~IRuntime() noexcept = default;
};
} // namespace nvinfer1
