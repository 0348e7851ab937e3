// The CPU engine for the avx2 instruction set (flags set in CMakeLists.txt).
#define TE_ISA_NS isa_avx2
#include "engine_impl.h"
