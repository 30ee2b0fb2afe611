"""A single-turn prompt/answer recipe (TRL's reward_funcs, verl's reward function) as an env.
Check it: forge env check examples.prompt_answer:PromptAnswerEnv --tasks examples/prompt_answer.jsonl"""

import re

from forge.env import Env, StepResult


def boxed_answer_reward(completion: str, answer: str) -> float:
    """1 for the right answer in \\boxed{}, 0.1 for a boxed wrong one, 0 for none."""
    found = re.findall(r"\\boxed\{([^}]*)\}", completion)
    if not found:
        return 0.0
    return 1.0 if found[-1].strip() == answer else 0.1


class PromptAnswerEnv(Env):
    blocking = False  # the reward is quick pure computation: called inline

    def reset(self, task, seed):
        self.answer = task["answer"]  # any column of the task file
        return task["prompt"]

    def step(self, action):  # one reply, scored, and the episode is done
        reward = boxed_answer_reward(action, self.answer)
        return StepResult("", reward=reward, done=True, info={"success": reward == 1.0})
