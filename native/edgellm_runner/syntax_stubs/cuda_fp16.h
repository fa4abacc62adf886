// Syntax-check stub (see README.md): cuda_fp16.h's host-callable half conversion.
#pragma once
struct __half
{
    unsigned short x;
};
__half __float2half_rn(float a);
