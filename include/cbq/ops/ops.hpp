#pragma once
// Every autodiff op. One file per op: forward, backward and the derivative rule side by side.
#include "cbq/ops/add.hpp"
#include "cbq/ops/common.hpp"
#include "cbq/ops/linear.hpp"
#include "cbq/ops/matmul.hpp"
