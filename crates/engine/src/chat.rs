//! Chat about one image: conversations and their messages live in SQLite, so a
//! conversation resumes by id in a later process; each question is answered by a
//! [`VisualChat`] model prompted with the history, as the BLIP-2 model card does.

use crate::{Error, Library, Result};
use magpie_core::{GenerationOptions, ImageId, VisualChat};
use magpie_media::DecodeOptions;
use magpie_store::{Conversation, ConversationId, Message, Role};
use serde::Serialize;
use std::sync::Arc;

/// A conversation and its messages, oldest first.
#[derive(Debug, Clone, Serialize)]
pub struct ChatHistory {
    pub conversation: Conversation,
    pub messages: Vec<Message>,
}

impl ChatHistory {
    /// The answered turns, (question, answer), in order.
    pub fn turns(&self) -> Vec<(&str, &str)> {
        turns(&self.messages)
    }
}

/// Pairs each user message with the assistant message that follows it; a question
/// without an answer is left out.
fn turns(messages: &[Message]) -> Vec<(&str, &str)> {
    messages
        .windows(2)
        .filter(|w| w[0].role == Role::User && w[1].role == Role::Assistant)
        .map(|w| (w[0].text.as_str(), w[1].text.as_str()))
        .collect()
}

/// The BLIP-2 prompt for `question` after the answered `history`, as in the model card's
/// chat example (`"Question: {} Answer: {}."` per turn, joined by spaces, then
/// `" Question: {question} Answer:"`):
///
/// ```
/// use magpie_engine::chat_prompt;
/// assert_eq!(chat_prompt(&[], "what is it?"), "Question: what is it? Answer:");
/// assert_eq!(
///     chat_prompt(&[("what is it?", "a dog")], "what colour?"),
///     "Question: what is it? Answer: a dog. Question: what colour? Answer:"
/// );
/// ```
pub fn chat_prompt(history: &[(&str, &str)], question: &str) -> String {
    let mut prompt = String::new();
    for (q, a) in history {
        prompt.push_str(&format!("Question: {q} Answer: {a}. "));
    }
    prompt.push_str(&format!("Question: {question} Answer:"));
    prompt
}

impl Library {
    /// Starts a conversation about the indexed file `file` with the chat model
    /// `chat_model` (recorded with it). Returns its id.
    pub async fn start_chat(&self, file: ImageId, chat_model: &str) -> Result<ConversationId> {
        self.indexed_file(file).await?;
        Ok(self.store.create_conversation(file, chat_model).await?.id)
    }

    /// A conversation with its messages.
    pub async fn conversation(&self, id: ConversationId) -> Result<ChatHistory> {
        let conversation = self.store.conversation(id).await?.ok_or(Error::UnknownConversation(id))?;
        let messages = self.store.messages(id).await?;
        Ok(ChatHistory { conversation, messages })
    }

    /// Conversations, oldest first: all, or those about one file.
    pub async fn conversations(&self, file: Option<ImageId>) -> Result<Vec<Conversation>> {
        Ok(self.store.conversations(file).await?)
    }

    /// Asks `question` in `conversation`: the model sees the image and the history,
    /// streams the answer's pieces to `on_text` as they come, and the question and its
    /// answer are then stored together. Returns the answer (trimmed).
    pub async fn ask(
        &self,
        conversation: ConversationId,
        question: &str,
        chat: Arc<dyn VisualChat>,
        opts: &GenerationOptions,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<String> {
        let question = question.trim();
        if question.is_empty() {
            return Err(Error::EmptyQuestion);
        }
        let history = self.conversation(conversation).await?;
        let file = self.store.get_file(history.conversation.file_id).await?.ok_or(Error::UnknownId(history.conversation.file_id))?;
        let prompt = chat_prompt(&history.turns(), question);

        // The model runs on the blocking pool; its pieces come back over a channel so
        // that `on_text` runs here and need not be 'static.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let opts = opts.clone();
        let path = file.path.clone();
        let job = tokio::task::spawn_blocking(move || -> Result<String> {
            let decode = DecodeOptions { min_side: Some(chat.input_side()), ..DecodeOptions::default() };
            let decoded = magpie_media::decode_file(&path, &decode)?;
            Ok(chat.answer(&decoded.image, &prompt, &opts, &mut |piece| {
                let _ = tx.send(piece.to_string());
            })?)
        });
        while let Some(piece) = rx.recv().await {
            on_text(&piece);
        }
        let answer = job.await.map_err(|e| Error::Task(e.to_string()))??;
        let answer = answer.trim().to_string();
        self.store.append_exchange(conversation, question, &answer).await?;
        Ok(answer)
    }
}
