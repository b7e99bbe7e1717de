#pragma once
// Optimisers and learning-rate schedules.
#include "cbq/optim/adam.hpp"
#include "cbq/optim/schedule.hpp"
