// The CPU engine for the avx512 instruction set (flags set in CMakeLists.txt).
#define TE_ISA_NS isa_avx512
#include "engine_impl.h"
