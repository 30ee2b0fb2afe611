"""A complete custom env. Check it: forge env check examples.custom_env:ReverseEnv"""

import random

from forge.env import Env, StepResult


class ReverseEnv(Env):
    system_prompt = "Reply with the given word spelled backwards."

    @classmethod
    def generate_tasks(cls, num_tasks, seed, **kwargs):
        rng = random.Random(seed)
        words = ["forge", "agent", "token", "reward", "policy", "sandbox"]
        return [{"task_id": str(i), "word": rng.choice(words)} for i in range(num_tasks)]

    def reset(self, task, seed):
        self.word, self.tries = task["word"], 0
        return f"Reverse this word: {self.word}"

    def step(self, action):
        self.tries += 1
        correct = action.strip() == self.word[::-1]
        done = correct or self.tries == 3
        feedback = "correct" if correct else "try again"
        return StepResult(feedback, reward=float(correct), done=done, info={"turns": self.tries})
