#pragma once
// Optimisers and learning-rate schedules.
